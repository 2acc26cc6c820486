"""`python -m stemref.edit` — the command lives in stemref/cli/edit.py (the editors are this package's modules)."""
import sys

from ..cli.edit import main

if __name__ == "__main__":
    sys.exit(main())
