"""Can the labelled heads improve the best peer's own network? deepbet fine-tuned, one fold.

    python benchmarks/deepbet_finetune.py data/BrainMask --held sri24 --steps 300 --frame 192 \\
        --lr 3e-4 --results benchmarks/results/deepbet_finetune
    python benchmarks/deepbet_finetune.py data/BrainMask --held sri24 --steps 0 --frame 256 ...  # as shipped

Issue #27 asks for a model ahead of deepbet + the rim rule on heads nobody trained on. With seven
labelled subjects no recipe of ours has got there, so this asks the question from the other end:
start from deepbet 1.0.2's network (trained on 7,837 T1 scans, MIT; read from the peers' venv,
``benchmarks/peers/install_brain_peers.sh``) and fine-tune it on every case of the other subjects
(leave one subject out, as ``brainmask_loso.py``). If that does not gain on the held-out head,
the labelled heads do not hold what beating deepbet needs.

deepbet's own frame is kept: its bounding-box network finds the head (at test time; in training
the reference's box), the box grows by 10 % a side, is resized to ``frame``³ and the intensities
are windowed at deepbet's 0.5/99.5 % quantiles. Targets are the references (``--labels``, our
definition) or the strips they were made from (``runs/BrainMaskStrips``, ``brainmask_strips.py``),
with the rule applied after. Augmentation: left-right mirror, gamma, noise. Loss BCE + Dice, AdamW,
poly decay, bf16 autocast, one thread. ``--steps 0`` scores deepbet's network as shipped in the same
frame. One JSON per run, the Dice at each threshold raw and after ``brain_from_strip``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from brainmask_loso import subjects_of
from scipy import ndimage as ndi

from medseg3d.datasets.brain_definition import brain_from_strip, largest_component
from medseg3d.evaluation.metrics import dice

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.3, 0.5, 0.7)
MARGIN = 0.1  # deepbet's box margin, a fraction of the box per side
Box = tuple[slice, slice, slice]


def deepbet_models() -> Path:
    """deepbet's two TorchScript networks inside the peers' venv."""
    found = sorted((ROOT / "runs" / "peers" / "brain-venv").glob("lib/python*/site-packages/data/models"))
    if not found:
        raise SystemExit("deepbet is not installed: run benchmarks/peers/install_brain_peers.sh")
    return found[0]


def canonical(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A scan or mask in RAS+ orientation (as deepbet reads it) and its spacing."""
    image = nib.as_closest_canonical(nib.load(str(path)))
    return np.asanyarray(image.dataobj).astype(np.float32), tuple(
        float(z) for z in image.header.get_zooms()[:3])  # type: ignore[return-value]


def box_around(mask: np.ndarray, margin: float = MARGIN) -> Box:
    """The bounding box of ``mask`` grown by ``margin`` of its size on each side, clipped."""
    sides = []
    for axis, n in enumerate(mask.shape):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        centre, size = (hit[0] + hit[-1] + 1) / 2, (hit[-1] + 1 - hit[0]) * (1 + 2 * margin)
        sides.append(slice(max(0, int(round(centre - size / 2))), min(n, int(round(centre + size / 2)))))
    return tuple(sides)  # type: ignore[return-value]


def thumbnail(volume: np.ndarray) -> torch.Tensor:
    """The 128³ nearest-neighbour copy deepbet's locator sees and its window is taken from."""
    return F.interpolate(torch.from_numpy(volume)[None, None], (128,) * 3, mode="nearest-exact")[0, 0]


def window(small: torch.Tensor) -> tuple[float, float]:
    """deepbet's intensity window: the 0.5 and 99.5 % quantiles of the ``thumbnail``."""
    return float(small.quantile(0.005)), float(small.quantile(0.995))


def to_frame(volume: np.ndarray, box: Box, frame: int, labels: bool = False) -> torch.Tensor:
    """The box of ``volume`` resized to ``frame``³ (nearest for labels, trilinear for images)."""
    crop = torch.from_numpy(np.ascontiguousarray(volume[box], dtype=np.float32))[None, None]
    if labels:
        return F.interpolate(crop, (frame,) * 3, mode="nearest-exact")[0, 0]
    return F.interpolate(crop, (frame,) * 3, mode="trilinear", align_corners=False)[0, 0]


def standardise(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """deepbet's input scaling: window to [0, 1], then mean 0.449 and std 0.226."""
    x = ((x - low) / (high - low)).clamp(0, 1)
    return 0.226 * (x - x.mean()) / x.std() + 0.449


def training_cases(dataset: Path, labels: Path, held: str, frame: int
                   ) -> list[tuple[torch.Tensor, torch.Tensor, float, float]]:
    """Every case of every other subject in deepbet's frame (box from the reference)."""
    subject = subjects_of(json.loads((dataset / "dataset.json").read_text()))
    cases = []
    for case in sorted(subject):
        if subject[case] == subject[held]:
            continue
        image, _ = canonical(dataset / "imagesTr" / f"{case}_0000.nii.gz")
        brain, _ = canonical(dataset / "labelsTr" / f"{case}.nii.gz")
        same = labels.resolve() == (dataset / "labelsTr").resolve()
        target = brain if same else canonical(labels / f"{case}.nii.gz")[0]
        box = box_around(brain > 0)
        cases.append((to_frame(image, box, frame), to_frame(target > 0, box, frame, labels=True),
                      *window(thumbnail(image))))
    return cases


def fine_tune(network: torch.jit.ScriptModule, cases: list, steps: int, lr: float,
              seed: int) -> None:
    """``steps`` AdamW steps of BCE + Dice on random cases, poly-decayed rate, bf16."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    network.train()
    optimiser = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=1e-5)
    start = time.time()
    for step in range(steps):
        for group in optimiser.param_groups:
            group["lr"] = lr * (1 - step / steps) ** 0.9
        x, y, low, high = cases[rng.integers(len(cases))]
        x = ((x - low) / (high - low)).clamp(0, 1) ** float(np.exp(rng.normal(0, 0.25)))
        if rng.random() < 0.5:  # the head's left-right mirror
            x, y = x.flip(0), y.flip(0)
        x = standardise(x, 0.0, 1.0) + torch.randn_like(x) * float(rng.uniform(0, 0.03))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            p = network(x[None, None].contiguous()).float()[0, 1]
        loss = (F.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), y)
                + 1 - 2 * (p * y).sum() / (p.sum() + y.sum() + 1))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 10 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.time() - start:.0f} s", flush=True)


@torch.no_grad()
def predict(network: torch.jit.ScriptModule, locator: torch.jit.ScriptModule,
            image: np.ndarray, frame: int) -> np.ndarray:
    """deepbet's two stages on ``image``: box from its locator, probability in the frame, back."""
    network.eval()
    small = thumbnail(image)
    low, high = window(small)
    located = largest_component(locator(standardise(small, low, high)[None, None])[0, 1].numpy() > 0.5)
    located = F.interpolate(torch.from_numpy(located.astype(np.float32))[None, None], image.shape,
                            mode="nearest-exact")[0, 0].numpy() > 0.5
    if not located.any():
        raise SystemExit("deepbet's locator found no head in the scan")
    box = box_around(located)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = network(standardise(to_frame(image, box, frame), low, high)[None, None])[0, 1]
    probability = np.zeros(image.shape, dtype=np.float32)
    probability[box] = F.interpolate(inside.float()[None, None], tuple(s.stop - s.start for s in box),
                                     mode="trilinear", align_corners=False)[0, 0].numpy()
    return probability


def scores(probability: np.ndarray, image: np.ndarray, reference: np.ndarray,
           spacing: tuple[float, float, float]) -> dict[str, dict[str, float]]:
    """Dice at each threshold: the largest piece, holes filled (deepbet's postprocessing), then
    the same after the definition of brain (``brain_from_strip``)."""
    out = {}
    for threshold in THRESHOLDS:
        mask = ndi.binary_fill_holes(largest_component(probability > threshold))
        out[str(threshold)] = {"raw": round(dice(mask, reference), 4),
                               "rule": round(dice(brain_from_strip(image, mask, spacing), reference), 4)}
    return out


def summarise(results: Path) -> str:
    """A markdown table of every run in ``results``: per setting and held-out head, the Dice
    after the rule at each threshold, the mean over seeds (and how many)."""
    table: dict[tuple[str, str], dict[str, list[float]]] = {}
    for path in sorted(results.glob("*__*.json")):
        record = json.loads(path.read_text())
        setting = record["name"].rsplit("_s", 1)[0] if record["steps"] else record["name"]
        cell = table.setdefault((setting, record["held"]), {})
        for threshold, dice_at in record["dice"].items():
            cell.setdefault(threshold, []).append(dice_at["rule"])
    heads = sorted({held for _, held in table})
    settings = sorted({setting for setting, _ in table})
    lines = ["# deepbet fine-tuned, leave one subject out: Dice after the rule (mean over seeds)", "",
             "Written by `python benchmarks/deepbet_finetune.py --summarise`; the runs: README.md.", "",
             "| setting | threshold | " + " | ".join(heads) + " |",
             "|---|---|" + "---|" * len(heads)]
    for setting in settings:
        for threshold in map(str, THRESHOLDS):
            cells = []
            for held in heads:
                values = table.get((setting, held), {}).get(threshold, [])
                cells.append(f"{np.mean(values):.4f} (n={len(values)})" if values else "")
            lines.append(f"| {setting} | {threshold} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path, nargs="?", help="data/BrainMask")
    parser.add_argument("--summarise", action="store_true",
                        help="only write RESULTS/summary.md from the runs there")
    parser.add_argument("--held", help="the case whose subject is left out and scored")
    parser.add_argument("--labels", type=Path, help="training targets (default: the references); "
                        "a folder under a name holding 'Strip' is recorded as strip targets")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--frame", type=int, default=192, help="deepbet's is 256")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="run name (default from the settings)")
    parser.add_argument("--results", type=Path, required=True)
    args = parser.parse_args()
    if args.summarise:
        (args.results / "summary.md").write_text(summarise(args.results))
        return
    if args.dataset is None or args.held is None:
        parser.error("DATASET and --held are needed to run")
    torch.set_num_threads(1)
    models = deepbet_models()
    network = torch.jit.load(str(models / "model.pt"), map_location="cpu")
    locator = torch.jit.load(str(models / "bbox_model.pt"), map_location="cpu").eval()
    labels = args.labels or args.dataset / "labelsTr"
    target = "strip" if "Strip" in str(labels) else "brain"
    name = args.name or (f"f{args.frame}_{target}_lr{args.lr:g}_steps{args.steps}_s{args.seed}"
                         if args.steps else f"f{args.frame}_as_shipped")
    start = time.time()
    if args.steps:
        fine_tune(network, training_cases(args.dataset, labels, args.held, args.frame),
                  args.steps, args.lr, args.seed)
    image, spacing = canonical(args.dataset / "imagesTr" / f"{args.held}_0000.nii.gz")
    reference, _ = canonical(args.dataset / "labelsTr" / f"{args.held}.nii.gz")
    dice_at = scores(predict(network, locator, image, args.frame), image, reference > 0, spacing)
    record = {"held": args.held, "name": name, "frame": args.frame, "target": target,
              "steps": args.steps, "lr": args.lr, "seed": args.seed, "dice": dice_at,
              "minutes": round((time.time() - start) / 60, 1), "command": " ".join(sys.argv)}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{name}__{args.held}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
