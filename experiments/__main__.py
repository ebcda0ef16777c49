"""``python -m experiments`` (from the repository root, or through ``bin/run_experiments``)."""

import sys

from experiments import main

if __name__ == "__main__":  # worker processes (-jobs) import this module again: they must not run it
    sys.exit(main())
