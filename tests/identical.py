"""Byte-identity check for refactoring: a seeded training run and predictions, hashed.

Run from anywhere (not collected by pytest: the name has no ``test_`` prefix)::

    python tests/identical.py --save before.json   # on the commit before a move
    python tests/identical.py --check before.json  # after it: exit 1 on any difference

What it hashes (SHA-256):
- the weights of a seeded ``medseg3d train`` run on a synthetic, anisotropic LPS dataset
  (30 steps in fp32, validation every epoch), read back as tensors so that file layout does
  not matter. fp32 because bf16 training is not repeatable on this CPU even on one thread: two
  identical runs skipped different numbers of steps for non-finite gradient norms;
- the label maps (voxel bytes, affine and dtype) that run and the shipped models predict on a
  synthetic case and, when ``data/`` is prepared, on Colin27 (brainmask) and the example CT
  (abdomenct, slow: ~45 s). Prediction keeps its defaults (bf16 where the CPU has it): it
  repeats bit for bit.

Everything runs in subprocesses with one thread, which makes CPU kernels deterministic here.
Timestamps and durations in the run's JSON files are not hashed: they change on every run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from synthetic import make_dataset  # noqa: E402

DATA = ROOT / "data"
REAL_CASES = {
    "brainmask": DATA / "BrainMaskT1" / "imagesTs" / "colin27_0000.nii.gz",
    "abdomenct": DATA / "AbdomenCT" / "imagesTr" / "ts_example_ct_0000.nii.gz",
}


def medseg3d(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "medseg3d", *args], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def label_map_hash(path: Path) -> str:
    image = nib.load(path)
    array = np.asarray(image.dataobj)
    digest = hashlib.sha256(array.tobytes())
    digest.update(str(array.dtype).encode() + np.asarray(image.affine).tobytes())
    return digest.hexdigest()


def weights_hash(run: Path) -> str:
    from safetensors.numpy import load_file
    digest = hashlib.sha256()
    for path in sorted(run.rglob("*.safetensors")):
        tensors = load_file(str(path))
        for name in sorted(tensors):
            digest.update(path.name.encode() + name.encode() + tensors[name].tobytes())
    return digest.hexdigest()


def fingerprints(work: Path, with_real: bool) -> dict[str, str]:
    dataset = make_dataset(work / "Dataset", num_cases=4, shape=(32, 36, 24), num_classes=3,
                           spacing=(1.0, 1.2, 2.0), codes="LPS")
    run = work / "run"
    medseg3d("train", str(dataset), "-o", str(run), "--steps", "30", "--val-every", "1",
             "--fold", "-1", "--seed", "3", "--device", "cpu", "--no-amp")
    scan = dataset / "imagesTr" / "case001_0000.nii.gz"
    results = {"training weights": weights_hash(run)}
    folder = work / "pred-folder"  # the trained run over a folder: the cohort path
    medseg3d("predict", str(dataset / "imagesTr"), "-o", str(folder), "--model", str(run),
             "--device", "cpu")
    for path in sorted(folder.glob("*.nii.gz")):
        results[f"trained run, {path.name}"] = label_map_hash(path)
    cases = [("brainmask", scan)] + [(m, c) for m, c in REAL_CASES.items() if with_real and c.is_file()]
    for model, case in cases:
        out = work / f"{model}-{case.name}"
        medseg3d("predict", str(case), "-o", str(out), "--model", model, "--device", "cpu")
        results[f"{model}, {case.name}"] = label_map_hash(out)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--save", type=Path, help="write the hashes to this JSON file")
    action.add_argument("--check", type=Path, help="compare with hashes saved before")
    parser.add_argument("--no-real", action="store_true", help="skip the prepared real scans")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        results = fingerprints(Path(work), with_real=not args.no_real)
    if args.save:
        args.save.write_text(json.dumps(results, indent=1) + "\n")
        print(json.dumps(results, indent=1))
        return 0
    before = json.loads(args.check.read_text())
    differ = [key for key in before if key in results and before[key] != results[key]]
    missing = sorted(set(before) ^ set(results))
    for key in results:
        print(f"{'DIFFERS' if key in differ else 'same   '}  {key}")
    if missing:
        print(f"not compared (only on one side): {', '.join(missing)}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
