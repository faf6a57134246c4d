"""Write the training fingerprint into a shipped model's model.json (models trained before it existed).

    python models/fingerprint.py data/BrainMaskT1 medseg3d/models/brainmask

Reads every training case of the dataset folder (the shipped models trained on all of them) and
sets ``fingerprint`` in ``MODEL_DIR/model.json``; the weights and their SHA-256 are untouched.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medseg3d.config import CheckpointMeta
from medseg3d.config_files import load_model_file, save_model_file
from medseg3d.datasets.fingerprint import fingerprint_cases
from medseg3d.datasets.folder import find_cases, load_spec, read_case
from medseg3d.runs import ModelFolder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("model_dir", type=Path)
    args = parser.parse_args()
    spec = load_spec(args.dataset)
    cases = [read_case(case, spec) for case in find_cases(args.dataset, spec)]
    meta_path = ModelFolder(args.model_dir).meta_file
    meta = load_model_file(CheckpointMeta, meta_path)
    fingerprint = fingerprint_cases(cases, list(spec.channel_names.values()))
    save_model_file(meta.model_copy(update={"fingerprint": fingerprint}), meta_path)
    print(f"{meta_path}: {fingerprint.model_dump_json()}")


if __name__ == "__main__":
    main()
