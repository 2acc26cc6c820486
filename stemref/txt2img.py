"""`python -m stemref.txt2img` — the command lives in stemref/cli/txt2img.py.

This file only gives the command the same name as the function `stemref.txt2img` (sampling.py).
Import `stemref.cli.txt2img`, not this module: importing it would rebind `stemref.txt2img` to a module.
"""
import sys

from .cli.txt2img import main

if __name__ == "__main__":
    sys.exit(main())
