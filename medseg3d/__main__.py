"""``python -m medseg3d`` (and ``torchrun -m medseg3d``) runs the command-line interface."""

from medseg3d.cli import main

if __name__ == "__main__":
    main()
