"""autotransfer plugin: read datasets stored as WebDataset tar shards (standard library tarfile only)."""

from .make_shards import ShardSummary, write_shards
from .source import WebDatasetSource

__version__ = "0.1.0"
__all__ = ["ShardSummary", "WebDatasetSource", "write_shards", "__version__"]
