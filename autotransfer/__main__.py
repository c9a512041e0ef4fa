"""`python -m autotransfer`: the same program as the `autotransfer` script (warm start included)."""

from autotransfer.entry import run

if __name__ == "__main__":
    run()
