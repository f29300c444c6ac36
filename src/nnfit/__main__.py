"""``python -m nnfit`` and ``torchrun --nproc-per-node N -m nnfit train ...``."""

import sys

from nnfit.cli import main

if __name__ == "__main__":  # spawned --devices workers import this module again: they must not rerun the CLI
    sys.exit(main())
