#!/usr/bin/env python
"""Write an image folder or builtin:digits as WebDataset shards; see autotransfer_webdataset.make_shards."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works before the package is installed

from autotransfer_webdataset.make_shards import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
