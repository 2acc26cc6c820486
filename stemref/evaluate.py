"""`python -m stemref.evaluate` — the command lives in stemref/cli/evaluate.py."""
import sys

from .cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
