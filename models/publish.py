"""Copy a training run's checkpoint into medseg3d/models/<name>/ and write its card (with SHA-256).

    python models/publish.py RUN_DIR NAME --description "..." --task "..." \
        --data-name BrainMaskT1 --data-licence "..." --hardware "..." --command "medseg3d train ..." \
        [--roles-from data/BrainMask --scheme "leave-one-subject-out ..." --choice "..."]

``--roles-from DATASET`` records every case's role (train / validation / test, from its
``dataset.json``) in the card's ``protocol``, with the evaluation ``--scheme`` and each choice
that validation made (``--choice``, repeatable).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medseg3d.datasets.folder import load_spec
from medseg3d.model_card import EvaluationProtocol, TrainingData
from medseg3d.runs import ModelFolder
from medseg3d.zoo import publish_model


def protocol_from(dataset: Path | None, scheme: str, choices: list[str]) -> EvaluationProtocol | None:
    """The card's protocol: each case's role as its dataset.json gives it (None without a dataset)."""
    if dataset is None:
        return None
    roles = {case: notes.role for case, notes in load_spec(dataset).cases.items() if notes.role}
    if not roles:
        raise SystemExit(f"{dataset / 'dataset.json'} gives no case a role")
    return EvaluationProtocol(scheme=scheme, roles=roles, choices=choices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("name")
    for option in ("description", "task", "data-name", "data-licence", "hardware", "command"):
        parser.add_argument(f"--{option}", required=True)
    parser.add_argument("--data-source", action="append", default=[])
    parser.add_argument("--metrics", default="{}", help="JSON object of held-out metrics")
    parser.add_argument("--fp16", action="store_true", help="store the weights as float16")
    parser.add_argument("--roles-from", type=Path, default=None, help="dataset whose roles the card records")
    parser.add_argument("--scheme", default="leave-one-subject-out over the test subjects")
    parser.add_argument("--choice", action="append", default=[], help="a choice validation made")
    parser.add_argument("--threshold", type=float, default=None,
                        help="foreground probability threshold chosen on validation cases")
    parser.add_argument("--brain-rule", action="store_true",
                        help="apply the definition of brain at the input's resolution (chosen on validation)")
    args = parser.parse_args()
    target = publish_model(
        args.run_dir, args.name, description=args.description, command=args.command,
        task=args.task, hardware=args.hardware, metrics=json.loads(args.metrics),
        training_data=TrainingData(name=args.data_name, sources=args.data_source,
                                   licence=args.data_licence, cases=None),
        half=args.fp16, protocol=protocol_from(args.roles_from, args.scheme, args.choice),
        foreground_threshold=args.threshold, brain_rule=args.brain_rule,
    )
    meta = ModelFolder(target).meta()  # the checkpoint predict uses
    print(f"published {target} (trained {meta.epoch} epochs)")


if __name__ == "__main__":
    main()
