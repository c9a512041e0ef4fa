"""autotransfer: search the best way to transfer a pretrained image model to a new dataset."""

__version__ = "0.1.0"
