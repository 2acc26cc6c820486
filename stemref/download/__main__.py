"""`python -m stemref.download`: the command lives in stemref/cli/download.py (the downloader is this package)."""
import sys

from ..cli.download import main

if __name__ == "__main__":
    sys.exit(main())
