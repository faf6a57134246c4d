"""``python -m medseg3d.experiments compare DATASET ...``: see ``medseg3d.experiments.cli``."""

from medseg3d.experiments.cli import app

if __name__ == "__main__":
    app()
