"""autotransfer plugin: ImageNet-pretrained MobileNetV1-0.25 backbones from a local weights folder."""

from .provider import ENV_VAR, NAMES, MobileNetV1Provider, source_classifier

__version__ = "0.1.0"
__all__ = ["ENV_VAR", "NAMES", "MobileNetV1Provider", "source_classifier", "__version__"]
