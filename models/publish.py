"""Copy a training run's checkpoint into medseg3d/models/<name>/ and write its card (with SHA-256).

    python models/publish.py RUN_DIR NAME --description "..." --task "..." \
        --data-name BrainMaskT1 --data-licence "..." --hardware "..." --command "medseg3d train ..."
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medseg3d.config import TrainingData
from medseg3d.zoo import publish_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("name")
    for option in ("description", "task", "data-name", "data-licence", "hardware", "command"):
        parser.add_argument(f"--{option}", required=True)
    parser.add_argument("--data-source", action="append", default=[])
    parser.add_argument("--metrics", default="{}", help="JSON object of held-out metrics")
    parser.add_argument("--fp16", action="store_true", help="store the weights as float16")
    args = parser.parse_args()
    target = publish_model(
        args.run_dir, args.name, description=args.description, command=args.command,
        task=args.task, hardware=args.hardware, metrics=json.loads(args.metrics),
        training_data=TrainingData(name=args.data_name, sources=args.data_source,
                                   licence=args.data_licence, cases=None),
        half=args.fp16,
    )
    meta = json.loads((target / "model.json").read_text())  # the checkpoint predict uses
    print(f"published {target} (trained {meta['epoch']} epochs)")


if __name__ == "__main__":
    main()
