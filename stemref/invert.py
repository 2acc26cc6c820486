"""`python -m stemref.invert` — the command lives in stemref/cli/invert.py.

This file only gives the command the same name as the function `stemref.invert` (inversion.py).
Import `stemref.cli.invert`, not this module: importing it would rebind `stemref.invert` to a module.
"""
import sys

from .cli.invert import main

if __name__ == "__main__":
    sys.exit(main())
