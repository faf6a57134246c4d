"""A simulated user corrects predictions click by click (issue 28), as nnInteractive and
SAM-Med3D are evaluated.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/interactive.py --model brainmask \\
        --case sri24=data/BrainMask/imagesTr/sri24_0000.nii.gz:data/BrainMask/labelsTr/sri24.nii.gz \\
        --out benchmarks/results/interactive/test [--method adapt --method constraints ...]
        [--set steps=12 --set band_mm=6]   # RefineConfig fields

Each click goes to the centre (the voxel farthest from its border) of the largest remaining
error component: a mark of the reference's value there, so positive in a missed region and
negative in a false one. Methods, all given the same clicks' positions in the same run:

* ``adapt``: ``Model.refine`` (refinement.py): the model adapts to all clicks so far, starting
  from the previous update's model, predicts the volume again and honours the clicks;
* ``constraints``: the clicks' balls written into the first prediction, no adaptation;
* ``randomwalker``: scikit-image's random walker on the plan grid, seeded by the clicks' balls
  and by the model's confident voxels farther than ``band_mm`` from its boundary.

Dice is recorded after every click and the seconds of each update (2 threads unless
OMP_NUM_THREADS says otherwise); ``OUT/<case>.<method>.json`` is written as soon as a case is
done, and an existing one is kept, so a stopped run resumes. ``--transfer`` adapts on the first
case and applies the saved model, unchanged, to the others (cohort transfer).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from skimage.segmentation import random_walker

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import medseg3d  # noqa: E402
from medseg3d.config import InferenceConfig, RefineConfig  # noqa: E402
from medseg3d.evaluation.metrics import dice  # noqa: E402
from medseg3d.inference.interactive import Marks, honour_marks, marks_on_plan_grid  # noqa: E402
from medseg3d.inference.preprocessing import label_map_on_grid, preprocess_image, restore_labels  # noqa: E402
from medseg3d.io.volumes import read_volume  # noqa: E402

REPORTED_CLICKS = (0, 1, 3, 5, 10)
CONFIDENT = 0.9  # the random walker's seeds: the model's voxels at least this sure


def next_click(labels: np.ndarray, reference: np.ndarray,
               values: list[int]) -> tuple[tuple[int, int, int], int]:
    """The centre of the largest error component and the reference's value there; only the
    foreground ``values`` that the reference labels count (a reference of the aorta alone
    says nothing about the liver)."""
    best: tuple[int, tuple[int, int, int], int] | None = None
    wrong = (labels != reference) & (np.isin(labels, values) | np.isin(reference, values))
    for value in np.unique(reference):
        pieces, count = ndimage.label(wrong & (reference == value))
        if count == 0:
            continue
        sizes = np.bincount(pieces.ravel())
        sizes[0] = 0
        largest = int(sizes.argmax())
        if best is not None and sizes[largest] <= best[0]:
            continue
        box = ndimage.find_objects((pieces == largest).astype(np.uint8))[0]
        inside = np.pad(pieces[box] == largest, 1)
        depth = ndimage.distance_transform_edt(inside)[1:-1, 1:-1, 1:-1]
        offset = np.unravel_index(int(depth.argmax()), depth.shape)
        centre = tuple(int(o + b.start) for o, b in zip(offset, box, strict=True))
        best = (int(sizes[largest]), centre, int(value))
    if best is None:
        raise ValueError("the prediction is already perfect")
    return best[1], best[2]


def mean_dice(labels: np.ndarray, reference: np.ndarray, values: list[int]) -> float:
    """Mean Dice over the foreground classes present in the reference."""
    return float(np.mean([dice(labels == v, reference == v) for v in values]))


def random_walker_labels(model: medseg3d.Model, volume, probabilities: np.ndarray, marks: Marks,
                         config: RefineConfig, beta: float) -> np.ndarray:
    """The classic seeded baseline: random walker on the plan grid from confident voxels and
    the clicks' balls, with the model's labels kept outside the band it solves."""
    plan = model.plan
    image, grid = preprocess_image(volume, plan)
    classes = probabilities.argmax(-1).astype(np.uint8)
    on_grid = label_map_on_grid(classes, grid).numpy()
    sure = label_map_on_grid((probabilities.max(-1) >= CONFIDENT).astype(np.uint8),
                             grid).numpy() > 0
    seeds = np.zeros(on_grid.shape, np.int32)
    for index in range(plan.num_classes):
        mask = on_grid == index
        deep = ndimage.distance_transform_edt(mask, sampling=plan.spacing) > config.band_mm
        seeds[deep & sure] = index + 1
    marked = marks_on_plan_grid(marks, grid, plan, config.radius_mm).numpy()
    seeds[marked >= 0] = marked[marked >= 0] + 1
    unknown = ndimage.find_objects((seeds == 0).astype(np.uint8))
    out = on_grid.copy()
    if unknown:
        box = tuple(slice(max(0, b.start - 1), b.stop + 1) for b in unknown[0])
        present = np.unique(seeds[box][seeds[box] > 0])
        if len(present) > 1:
            x = image[0].numpy()[box]
            x = (x - x.mean()) / (x.std() + 1e-6)
            solved = random_walker(x, seeds[box], beta=beta, mode="cg_j", tol=1e-3)
            out[box] = np.where(seeds[box] > 0, seeds[box], solved) - 1
    return restore_labels(torch.from_numpy(out.astype(np.uint8)), grid, plan)


def run_case(model: medseg3d.Model, image: Path, reference_path: Path, method: str,
             clicks: int, config: RefineConfig, beta: float) -> dict:
    volume = read_volume(image)
    reference = read_volume(reference_path).array.astype(np.int64)
    values = [v for v in model.labels.values() if v != 0 and (reference == v).any()]
    start = model.predict_volume(volume, InferenceConfig(save_probabilities=True))
    labels = start.labels
    scores, seconds = [mean_dice(labels, reference, values)], []
    current, marks = model, None
    for _ in range(clicks):
        voxel, value = next_click(labels, reference, values)
        click = model.marks([voxel], [value], volume.spatial_shape)
        marks = click if marks is None else marks + click
        began = time.perf_counter()
        if method == "adapt":
            current = current.adapt(volume, labels, marks, config=config)
            labels = current.predict_marked(volume, marks, config).labels
        elif method == "constraints":
            labels = honour_marks(start.labels, marks, volume.spacing, config.radius_mm)
        elif method == "randomwalker":
            labels = random_walker_labels(model, volume, start.probabilities, marks, config, beta)
        else:
            raise ValueError(f"unknown method {method}")
        seconds.append(time.perf_counter() - began)
        scores.append(mean_dice(labels, reference, values))
        print(f"{image.name} {method} click {len(seconds)} ({'+' if value else '-'}{value}): "
              f"Dice {scores[-1]:.4f}, {seconds[-1]:.1f} s", flush=True)
    return {"image": str(image), "reference": str(reference_path), "method": method,
            "dice": scores, "seconds": seconds, "config": config.model_dump(), "beta": beta,
            "clicks": marks.voxels.tolist() if marks is not None else [],
            "values": marks.values.tolist() if marks is not None else []}


def transfer(model: medseg3d.Model, cases: list[tuple[str, Path, Path]], clicks: int,
             config: RefineConfig, out: Path) -> dict:
    """Adapt on the first case, save, load and apply the saved model to the other cases."""
    name, image, reference_path = cases[0]
    volume = read_volume(image)
    reference = read_volume(reference_path).array.astype(np.int64)
    values = [v for v in model.labels.values() if v != 0 and (reference == v).any()]
    labels = model.predict(volume)
    current, marks = model, None
    for _ in range(clicks):
        voxel, value = next_click(labels, reference, values)
        click = model.marks([voxel], [value], volume.spatial_shape)
        marks = click if marks is None else marks + click
        current = current.adapt(volume, labels, marks, config=config)
        labels = current.predict_marked(volume, marks, config).labels
    with tempfile.TemporaryDirectory() as folder:
        current.save(Path(folder) / "adapted")
        adapted = medseg3d.load_model(Path(folder) / "adapted", device="cpu")
    rows = {}
    for other, other_image, other_reference in cases[1:]:
        ref = read_volume(other_reference).array.astype(np.int64)
        values = [v for v in model.labels.values() if v != 0 and (ref == v).any()]
        rows[other] = {"base": mean_dice(model.predict(other_image), ref, values),
                       "adapted": mean_dice(adapted.predict(other_image), ref, values)}
        print(f"transfer {name} -> {other}: {rows[other]}", flush=True)
    return {"adapted_on": name, "clicks": clicks, "config": config.model_dump(), "cases": rows}


def summarise(out: Path) -> str:
    """A Markdown table of every ``OUT/<case>.<method>.json``: Dice after 0, 1, 3, 5 and 10
    clicks, the gain after 5, and the mean and slowest seconds per update."""
    rows = ["| case | method | " + " | ".join(f"{n} clicks" for n in REPORTED_CLICKS)
            + " | gain after 5 | s/update mean (max) |", "|---" * (len(REPORTED_CLICKS) + 4) + "|"]
    for path in sorted(out.glob("*.*.json")):
        result = json.loads(path.read_text())
        scores = result["dice"]
        cells = [f"{scores[n]:.4f}" if n < len(scores) else "" for n in REPORTED_CLICKS]
        gain = scores[5] - scores[0] if len(scores) > 5 else float("nan")
        rows.append(f"| {result['case']} | {result['method']} | " + " | ".join(cells)
                    + f" | {gain:+.4f} | {np.mean(result['seconds']):.1f} "
                    f"({np.max(result['seconds']):.1f}) |")
    return "\n".join(rows) + "\n"


def parse_case(text: str) -> tuple[str, Path, Path]:
    name, _, paths = text.partition("=")
    image, _, reference = paths.partition(":")
    return name, Path(image), Path(reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="brainmask")
    parser.add_argument("--case", action="append", default=[], type=parse_case,
                        help="NAME=IMAGE:REFERENCE (repeatable)")
    parser.add_argument("--method", action="append", choices=["adapt", "constraints",
                                                              "randomwalker"])
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a RefineConfig field (repeatable)")
    parser.add_argument("--beta", type=float, default=130.0, help="random walker's beta")
    parser.add_argument("--transfer", action="store_true",
                        help="adapt on the first case, apply the saved model to the others")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--summary", action="store_true", help="only write OUT/summary.md")
    args = parser.parse_args()
    if args.summary:
        (args.out / "summary.md").write_text(summarise(args.out))
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    config = RefineConfig(**dict(item.split("=", 1) for item in args.set))
    model = medseg3d.load_model(args.model, device="cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.transfer:
        result = transfer(model, args.case, args.clicks, config, args.out)
        (args.out / f"transfer.{args.case[0][0]}.json").write_text(json.dumps(result, indent=1))
        return
    for name, image, reference in args.case:
        for method in args.method or ["adapt", "constraints", "randomwalker"]:
            path = args.out / f"{name}.{method}.json"
            if path.exists():
                continue
            result = run_case(model, image, reference, method, args.clicks, config, args.beta)
            result["case"], result["model"] = name, args.model
            result["command"] = " ".join(sys.argv)
            path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
