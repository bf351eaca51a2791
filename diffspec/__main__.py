"""`python -m diffspec ...`, the same as the `diffspec` command; torchrun launches it this way:
`torchrun --nproc-per-node N -m diffspec eval ...` (data-parallel evaluation)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
