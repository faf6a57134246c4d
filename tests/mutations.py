"""Mutation check: put plausible bugs into a copy of medseg3d and see that the tests catch them.

Run from anywhere (not collected by pytest: the name has no ``test_`` prefix)::

    python tests/mutations.py                  # every mutant, after a baseline run
    python tests/mutations.py ema_lerp_weight  # only the mutants named
    python tests/mutations.py --list           # names, files and tests
    python tests/mutations.py --no-baseline    # skip the unmutated run of the selected tests

Each mutant replaces one exact snippet of one module (the snippet must occur exactly once, and
the mutated module must still compile). The working tree is never modified: ``medseg3d/``,
``tests/`` and ``pyproject.toml`` are copied to a temporary folder, and pytest runs there
(``-x -q``, under ``nice -n 15``) on the test files or test ids the mutant names, which import
the copy. A mutant is caught when those tests fail (pytest exit status 1); it survives when they
pass. First the selected tests run once unmutated and must pass, or a catch would mean nothing.
Exit status 1 when a mutant survives or a run errs; 0 otherwise.

The first five mutants are the bugs of issue #33, each of which once passed every relevant test
file; the others are bugs a refactoring could plausibly bring.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600  # per pytest run; a mutant that hangs its tests counts as caught ("timeout")


@dataclass(frozen=True)
class Mutant:
    name: str
    module: str  # path relative to the repository root
    old: str  # exact snippet, found exactly once
    new: str
    tests: tuple[str, ...]  # test files or test ids, relative to the repository root
    bug: str  # one line: what the mutant gets wrong


TRAINING = "tests/training/test_loop.py::"
MUTANTS = [
    # ---- issue #33
    Mutant("largest_component_skipped", "medseg3d/inference/predict.py",
           "    if meta.largest_component:\n        labels = keep_largest_component(",
           "    if False:\n        labels = keep_largest_component(",
           ("tests/inference/test_predict.py", "tests/inference/test_postprocessing.py"),
           "prediction skips the checkpoint's largest-component postprocessing"),
    Mutant("ema_lerp_weight", "medseg3d/training/step.py",
           "torch._foreach_lerp_(mine, theirs, 1.0 - decay)",
           "torch._foreach_lerp_(mine, theirs, decay)",
           (TRAINING + "test_weight_average_moves_towards_the_network_by_one_minus_its_decay",),
           "the weight average moves by decay instead of 1 - decay"),
    Mutant("setup_device_not_rank_gpu", "medseg3d/training/loop.py",
           "data.plan.num_classes,\n                          **config.network.options).to(device)",
           "data.plan.num_classes,\n                          **config.network.options)"
           ".to(training_device(config, Rank()))",
           ("tests/training/test_training_devices.py",),
           "setup moves the network to the resolved device, not the rank's GPU"),
    Mutant("read_ahead_next_scan", "medseg3d/cohort/pipeline.py",
           "            volume = future.result()\n"
           "            if i + 1 < len(cases):\n"
           "                future = pool.submit(read, cases[i + 1], max_bytes)\n",
           "            if i + 1 < len(cases):\n"
           "                future = pool.submit(read, cases[i + 1], max_bytes)\n"
           "            volume = future.result()\n",
           ("tests/cohort/test_cohort.py",),
           "folder read-ahead pairs each case with the next scan"),
    Mutant("resume_forgets_weights", "medseg3d/training/resume.py",
           '    unwrap(model).load_state_dict(_with_prefix(tensors, "model."))\n',
           "    pass\n",
           ("tests/training/test_resume.py",),
           "--resume restores everything but the network's weights"),
    # ---- more plausible bugs
    Mutant("gaussian_weights_ignored", "medseg3d/inference/windows.py",
           "        return weights.clamp_(min=min_weight).float()",
           "        return torch.ones_like(weights).float()",
           ("tests/inference/test_engine.py",),
           "sliding windows are summed without their Gaussian weights"),
    Mutant("last_window_missing", "medseg3d/inference/windows.py",
           "    return [round(spread * i) for i in range(count)]",
           "    return [round(spread * i) for i in range(count - 1)]",
           ("tests/inference/test_engine.py",),
           "window starts leave out the last window of an axis"),
    Mutant("mirror_not_flipped_back", "medseg3d/inference/engine.py",
           "total += torch.flip(forward(torch.flip(inputs, dims)), dims)",
           "total += forward(torch.flip(inputs, dims))",
           ("tests/inference/test_engine.py",),
           "mirroring TTA adds the mirrored logits without flipping them back"),
    Mutant("axis_flip_both_ways", "medseg3d/io/orientation.py",
           "    return nib.orientations.io_orientation(affine)\n",
           "    return nib.orientations.io_orientation(affine) * [[1, 1], [1, 1], [1, -1]]\n",
           ("tests/inference/test_preprocessing.py",),
           "reorientation flips the third axis, on the way in and on the way back"),
    Mutant("probabilities_nearest", "medseg3d/inference/predict.py",
           "    probabilities = resize(output, grid.canonical_shape)\n",
           "    probabilities = torch.nn.functional.interpolate(\n"
           "        output[None], size=grid.canonical_shape, mode='nearest')[0]\n",
           ("tests/inference/test_predict.py",),
           "probabilities come back to the input grid by nearest neighbour, not linearly"),
    Mutant("zscore_mean_std_swapped", "medseg3d/inference/preprocessing.py",
           'channel if norm.scheme == "zscore" else out[c], mean, std)',
           'channel if norm.scheme == "zscore" else out[c], std, mean)',
           ("tests/inference/test_preprocessing.py",),
           "normalisation swaps mean and standard deviation"),
    Mutant("label_dtype_uint8", "medseg3d/inference/preprocessing.py",
           "    dtype = label_dtype(int(values.max()))\n",
           "    dtype = np.dtype(np.uint8)\n",
           ("tests/inference/test_preprocessing.py",),
           "restored labels are uint8 whatever the values (300 becomes 44)"),
    Mutant("label_lookup_skipped", "medseg3d/inference/preprocessing.py",
           "    if np.array_equal(values, np.arange(len(values))):",
           "    if True:",
           ("tests/inference/test_preprocessing.py",),
           "class indices are written as label values without the lookup table"),
    Mutant("atomic_write_not_renamed", "medseg3d/io/atomic.py",
           "    if replace:\n        os.replace(tmp, path)\n        return\n",
           "    if replace:\n        shutil.copyfile(tmp, path)\n        tmp.unlink()\n        return\n",
           ("tests/io/test_atomic.py",),
           "an atomic write copies into the old file instead of renaming over it"),
    Mutant("lock_not_taken", "medseg3d/io/lock.py",
           "            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n",
           "            pass\n",
           ("tests/io/test_lock.py",),
           "output locks are never taken"),
    Mutant("ema_not_saved", "medseg3d/training/loop.py",
           "        return self.average.network if self.average is not None "
           "else unwrap(self.ctx.model)",
           "        return unwrap(self.ctx.model)",
           (TRAINING + "test_checkpoints_hold_the_weight_average_not_the_last_weights",),
           "checkpoints hold the last weights, not the weight average"),
    Mutant("validation_drops_last_case", "medseg3d/training/validation.py",
           "    for item in items[rank.index::rank.world]:",
           "    for item in items[rank.index:-1:rank.world]:",
           (TRAINING + "test_validation_scores_every_case",),
           "validation leaves out the last case"),
    Mutant("one_piece_classes_not_recorded", "medseg3d/training/data.py",
           "    return single\n",
           "    return []\n",
           (TRAINING + "test_a_class_in_one_piece_in_every_training_label_is_postprocessed",),
           "training never records the classes to postprocess"),
    Mutant("resume_forgets_optimizer", "medseg3d/training/resume.py",
           "    optimizer.load_state_dict({",
           "    dict({",
           ("tests/training/test_resume.py",),
           "--resume starts the optimizer afresh (no moments, no step count)"),
    Mutant("resume_restarts_average_warmup", "medseg3d/training/loop.py",
           "            average.updates = state.step\n",
           "            average.updates = 0\n",
           ("tests/training/test_resume.py",),
           "--resume restarts the weight average's warm-up"),
    Mutant("split_class_chosen", "medseg3d/inference/postprocessing.py",
           "if shares and min(shares) >= ONE_PIECE_SHARE:",
           "if shares and max(shares) >= ONE_PIECE_SHARE:",
           ("tests/inference/test_postprocessing.py",),
           "a class split in some training label is still postprocessed"),
]


def copy_tree(target: Path) -> None:
    """The package, the tests and pytest's configuration, as they are in the working tree."""
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")
    shutil.copytree(ROOT / "medseg3d", target / "medseg3d", ignore=shutil.ignore_patterns(
        "__pycache__", "*.pyc", "models"))
    os.symlink(ROOT / "medseg3d" / "models", target / "medseg3d" / "models")  # never mutated
    shutil.copytree(ROOT / "tests", target / "tests", ignore=skip)
    shutil.copy(ROOT / "pyproject.toml", target / "pyproject.toml")


def environment(copy: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # no stale bytecode between mutants
    env["PYTHONPATH"] = os.pathsep.join([str(copy), *filter(None, [env.get("PYTHONPATH")])])
    return env


def check_import(copy: Path) -> None:
    """The tests must import the copy, not the working tree's (editable) package."""
    found = subprocess.run([sys.executable, "-c", "import medseg3d; print(medseg3d.__file__)"],
                           cwd=copy, env=environment(copy), capture_output=True, text=True,
                           check=True).stdout.strip()
    if not Path(found).is_relative_to(copy):
        raise SystemExit(f"the tests would import {found}, not the copy in {copy}")


def run_tests(copy: Path, tests: list[str]) -> tuple[str, float, str]:
    """('pass' | 'fail' | 'timeout' | 'error rc=N', seconds, output) of pytest on ``tests``."""
    command = ["nice", "-n", "15", sys.executable, "-m", "pytest", "-x", "-q",
               "-p", "no:cacheprovider", *tests]
    started = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=copy, env=environment(copy), capture_output=True,
                                text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - started, ""
    seconds = time.perf_counter() - started
    outcome = {0: "pass", 1: "fail"}.get(result.returncode, f"error rc={result.returncode}")
    return outcome, seconds, result.stdout + result.stderr


def tail(output: str, lines: int = 15) -> str:
    return "\n".join(output.strip().splitlines()[-lines:])


def first_failure(output: str) -> str:
    """The test that failed first (``-x``: the only one), from pytest's short summary."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split()[1].split("::", 1)[-1].split(" ")[0]
    return ""


def shown(tests: tuple[str, ...]) -> str:
    """Test files for the table; a file run for one test only is marked ``(1 test)``."""
    return " ".join(t.removeprefix("tests/").split("::")[0] + (" (1 test)" if "::" in t else "")
                    for t in tests)


def mutate(source: str, mutant: Mutant) -> str:
    count = source.count(mutant.old)
    if count != 1:
        raise SystemExit(f"{mutant.name}: the snippet occurs {count} times in {mutant.module}, "
                         "expected once; update the mutant to the current code")
    mutated = source.replace(mutant.old, mutant.new)
    compile(mutated, mutant.module, "exec")  # a syntax error would be "caught" for nothing
    return mutated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the unmutated run of the selected tests")
    args = parser.parse_args(argv)
    known = {m.name: m for m in MUTANTS}
    if unknown := [n for n in args.names if n not in known]:
        parser.error(f"unknown mutant(s) {', '.join(unknown)}; see --list")
    selected = [known[n] for n in args.names] if args.names else MUTANTS
    if args.list:
        for m in selected:
            print(f"{m.name:32} {m.module:28} {m.bug}\n{'':32} {' '.join(m.tests)}")
        return 0
    for m in selected:  # every snippet is checked before anything runs
        mutate((ROOT / m.module).read_text(encoding="utf-8"), m)

    with tempfile.TemporaryDirectory(prefix="medseg3d-mutants-") as folder:
        copy = Path(folder)
        copy_tree(copy)
        check_import(copy)
        if not args.no_baseline:
            tests = sorted({t for m in selected for t in m.tests})
            outcome, seconds, output = run_tests(copy, tests)
            print(f"baseline (no mutant): {outcome} in {seconds:.0f} s", flush=True)
            if outcome != "pass":
                print(tail(output))
                return 1
        rows = []
        for m in selected:
            path = copy / m.module
            original = path.read_text(encoding="utf-8")
            try:
                path.write_text(mutate(original, m), encoding="utf-8")
                outcome, seconds, output = run_tests(copy, list(m.tests))
            finally:
                path.write_text(original, encoding="utf-8")
            caught = {"fail": "yes", "timeout": "yes (timeout)", "pass": "NO"}.get(outcome, outcome)
            rows.append((m.name, shown(m.tests), caught, f"{seconds:.0f}", first_failure(output)))
            print(f"{m.name}: {caught} ({seconds:.0f} s)", flush=True)
            if not caught.startswith("yes"):
                print(tail(output))

    header = ("mutant", "tests", "caught", "s", "first failing test")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    failures = [r for r in rows if not r[2].startswith("yes")]
    print(f"\n{len(rows) - len(failures)} of {len(rows)} mutants caught")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
