"""autotransfer plugin: k-nearest-neighbour leave-one-out accuracy as a transferability score."""

from .knn import knn_loo_accuracy

__version__ = "0.1.0"
__all__ = ["knn_loo_accuracy", "__version__"]
