"""``medseg3d compare``: folds, sweep, seeds, resumable cells and the ranking report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from synthetic import make_dataset
from typer.testing import CliRunner

from medseg3d.datasets.folder import Case
from medseg3d.errors import MedsegError
from medseg3d.experiments.cli import app
from medseg3d.experiments.compare import _run_or_skip
from medseg3d.experiments.folds import make_folds, sweep_split
from medseg3d.experiments.records import Protocol, cell_path
from medseg3d.io.lock import output_locks

runner = CliRunner()
NETWORKS = ["unet", "asmlp3d", "patchfree", "mixer3d_1m", "mixer3d_skip_1m"]
# Tiny widths so that one training step and one prediction take well under a second.
TINY_OPTIONS = ["unet.filters=[4,8]", "asmlp3d.embed_dim=4", "asmlp3d.depths=[1,1]",
                "patchfree.filters=[4,8]", "mixer3d_1m.dim=16", "mixer3d_1m.depth=1",
                "mixer3d_1m.patch_size=4", "mixer3d_skip_1m.dim=16", "mixer3d_skip_1m.depth=1",
                "mixer3d_skip_1m.patch_size=4"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: small networks run faster so on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _hold_out(root: Path, case: str, annotated: list[str] | None = None) -> Path:
    for kind, name in (("images", f"{case}_0000.nii.gz"), ("labels", f"{case}.nii.gz")):
        (root / f"{kind}Ts").mkdir(exist_ok=True)
        shutil.move(root / f"{kind}Tr" / name, root / f"{kind}Ts" / name)
    spec = json.loads((root / "dataset.json").read_text())
    spec["numTraining"] -= 1
    if annotated:
        spec["cases"] = {case: {"annotated": annotated}}
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


@pytest.fixture
def study(tmp_path):
    """Four training cases, one held-out case annotated for 'blob' only, and a stress set."""
    root = _hold_out(make_dataset(tmp_path / "data", num_cases=5, shape=(16, 16, 16),
                                  num_classes=3), "case004", ["blob"])
    stress = make_dataset(tmp_path / "stress", num_cases=2, shape=(16, 16, 16), num_classes=3)
    for case in ("case000", "case001"):
        _hold_out(stress, case)
    return root, stress


def _args(root: Path, stress: Path, out: Path, networks: list[str]) -> list[str]:
    args = ["compare", root, "--models", ",".join(networks), "--steps", "2", "--seeds", "0,1",
            "--folds", "3", "--lr", "1e-3,3e-3", "--sweep-steps", "1", "--extra-test", stress,
            "-o", out, "--patch-size", "16,16,16", "--spacing", "1,1,1", "--device", "cpu",
            "--augment", "none"]
    for option in TINY_OPTIONS:
        if option.split(".")[0] in networks:
            args += ["--option", option]
    return [str(a) for a in args]


def test_compare_runs_every_cell_resumes_and_ranks(study, tmp_path):
    root, stress = study
    out = tmp_path / "cmp"
    result = runner.invoke(app, _args(root, stress, out, NETWORKS))
    assert result.exit_code == 0, result.output
    ranking = json.loads((out / "ranking.json").read_text())
    assert ranking["finished_cells"] == ranking["expected_cells"] == 3 * 2 * len(NETWORKS)
    cv, stress_group = ranking["groups"]
    assert cv["group"] == "cross-validation" and cv["cases"] == 5  # every labelled case once
    assert stress_group["group"] == "stress" and stress_group["cases"] == 2
    assert {r["network"] for r in cv["networks"]} == set(NETWORKS)
    for row in cv["networks"]:
        assert row["steps"] == 2 and row["seeds"] == [0, 1] and row["parameters"] > 0
        assert 0.0 <= row["dice"]["mean"] <= 1.0 and row["gflops_per_forward"] > 0
    assert len(cv["pairs"]) == 2 * len(NETWORKS) * (len(NETWORKS) - 1) // 2
    assert len(ranking["sweep"]) == 2 * len(NETWORKS)
    assert sum(s["chosen"] for s in ranking["sweep"]) == len(NETWORKS)
    # the held-out case is scored on its annotated class only; the patch-free net trained whole
    cell = json.loads(next((out / "cells" / "final" / "patchfree").glob("*fold0.json"))
                      .read_text())
    assert set(cell["cases"][0]["classes"]) == {"blob"}
    assert {s["test_set"] for s in cell["cases"]} == {"fold", "stress"}
    plan = json.loads(next((out / "runs" / "final" / "patchfree").glob("*/plan.json"))
                      .read_text())
    assert plan["patch_size"] == [16, 16, 16]
    mixer = json.loads(next((out / "cells" / "final" / "mixer3d_1m").glob("*.json")).read_text())
    assert mixer["options"]["input_size"] == [16, 16, 16]  # the shared patch
    rows = (out / "cases.csv").read_text().splitlines()
    assert len(rows) == 1 + len(NETWORKS) * 2 * (3 + 2 + 2)  # fold 0: 1 + 2 stress cases
    for figure in ("ranking.png", "slices.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cross-validation" in (out / "ranking.md").read_text()

    # a rerun trains nothing: every cell is finished
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")}
    again = runner.invoke(app, _args(root, stress, out, NETWORKS))
    assert again.exit_code == 0, again.output
    assert "training" not in again.output
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")}

    # --report-only trains nothing, even where a cell is missing
    lost = next(p for p in stamps if "final" in p.parts)
    lost.unlink()
    report = runner.invoke(app, [*_args(root, stress, out, NETWORKS), "--report-only"])
    assert report.exit_code == 0 and ": training on" not in report.output
    assert json.loads((out / "ranking.json").read_text())["finished_cells"] == 3 * 2 * len(
        NETWORKS) - 1

    # a lost cell is redone alone
    again = runner.invoke(app, _args(root, stress, out, NETWORKS))
    assert again.exit_code == 0 and again.output.count(": training on") == 1


def test_a_folder_refuses_another_protocol(study, tmp_path):
    root, stress = study
    out = tmp_path / "cmp"
    assert runner.invoke(app, _args(root, stress, out, ["unet"])).exit_code == 0
    other = _args(root, stress, out, ["unet"])
    other[other.index("--steps") + 1] = "3"
    result = runner.invoke(app, other)
    assert result.exit_code == 1 and "another protocol" in result.output and "steps" in result.output


def test_a_cell_held_by_another_process_is_skipped(study, tmp_path):
    root, _ = study
    protocol = Protocol(dataset=str(root), networks=["unet"], steps=1, seeds=[0])
    path = cell_path(tmp_path, "final", "unet", 1e-3, 1e-5, 0, 0)
    path.parent.mkdir(parents=True)
    lines: list[str] = []
    with output_locks([path]):
        _run_or_skip(protocol, tmp_path, "final", "unet", 1e-3, 1e-5, 0, 0, [], {}, lines.append)
    assert not path.exists() and not lines


def _cases(*ids: str) -> list[Case]:
    return [Case(i, (Path(f"{i}_0000.nii.gz"),), Path(f"{i}.nii.gz")) for i in ids]


@pytest.mark.parametrize("n_train, n_test, folds", [(3, 1, 4), (3, 1, 5), (9, 2, 5), (6, 0, 3)])
def test_folds_test_every_labelled_case_once(n_train: int, n_test: int, folds: int) -> None:
    train = _cases(*(f"t{i}" for i in range(n_train)))
    test = _cases(*(f"h{i}" for i in range(n_test)))
    made = make_folds(train, test, folds)
    tested = [c for f in made for c in f.test]
    assert sorted(tested) == sorted(c.case_id for c in [*train, *test])
    for fold in made:
        assert not set(fold.train) & set(fold.test)
    if n_test:
        assert made[0].test == [c.case_id for c in test] and made[0].extra
        assert not any(f.extra for f in made[1:])
    assert len(made) == min(folds, n_train + (1 if n_test else 0))


def test_sweep_validates_on_fold_zero_training_cases_only() -> None:
    folds = make_folds(_cases("a", "b", "c"), _cases("h"), 4)
    fit, val = sweep_split(folds[0], 0.34)
    assert len(val) == 1 and sorted(fit + val) == ["a", "b", "c"] and "h" not in fit + val
    with pytest.raises(MedsegError):
        sweep_split(folds[0].model_copy(update={"train": ["a"]}), 0.34)


@pytest.mark.parametrize("flag, value, message", [
    ("--seeds", "0,0", "repeats"), ("--models", ",", "no network"), ("--lr", "", "learning_rates")])
def test_bad_protocols_get_one_line(study, tmp_path, flag, value, message):
    root, stress = study
    args = _args(root, stress, tmp_path / "cmp", ["unet"])
    args[args.index(flag) + 1] = value
    result = runner.invoke(app, args)
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and message in text and "Traceback" not in text
    assert not (tmp_path / "cmp").exists()


def test_extra_tests_need_the_dataset_s_own_test_cases(study, tmp_path):
    root, stress = study
    for kind in ("images", "labels"):  # put the held-out case back into training
        for file in (root / f"{kind}Ts").iterdir():
            shutil.move(file, root / f"{kind}Tr" / file.name)
        (root / f"{kind}Ts").rmdir()
    spec = json.loads((root / "dataset.json").read_text())
    spec["numTraining"] = 5
    (root / "dataset.json").write_text(json.dumps(spec))
    result = runner.invoke(app, _args(root, stress, tmp_path / "cmp", ["unet"]))
    assert result.exit_code == 1 and "imagesTs" in result.output
    assert not (tmp_path / "cmp").exists()  # nothing written that a corrected run would refuse


def test_subject_split_curves_and_equal_wall_time(tmp_path):
    """One fold per subject (a subject's two scans stay together), a validation case in no
    fold, learning curves on it, and equal-wall-time cells for every network but the reference."""
    root = make_dataset(tmp_path / "data", num_cases=5, shape=(16, 16, 16), num_classes=2)
    spec = json.loads((root / "dataset.json").read_text())
    spec["cases"] = {"case000": {"subject": "a"}, "case001": {"subject": "a"},
                     "case002": {"subject": "b"}, "case003": {"subject": "c"},
                     "case004": {"subject": "v"}}
    (root / "dataset.json").write_text(json.dumps(spec))
    out, networks = tmp_path / "cmp", ["unet", "mixer3d_1m"]
    args = ["compare", root, "--models", ",".join(networks), "--steps", "4", "--seeds", "0",
            "--split", "subject", "--validation-cases", "case004", "--curve-every", "2",
            "--wall-reference", "unet", "--lr", "1e-3,3e-3", "--sweep-steps", "2", "-o", out,
            "--patch-size", "16,16,16", "--spacing", "1,1,1", "--device", "cpu",
            "--augment", "none"]
    for option in TINY_OPTIONS:
        if option.split(".")[0] in networks:
            args += ["--option", option]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    folds = json.loads((out / "folds.json").read_text())
    assert [f["test"] for f in folds] == [["case000", "case001"], ["case002"], ["case003"]]
    assert all("case004" not in f["train"] for f in folds)
    ranking = json.loads((out / "ranking.json").read_text())
    assert ranking["sweep_validation_cases"] == ["case004"]
    # 3 folds x (2 equal-step networks + 1 equal-time network: the reference's are its own)
    assert ranking["finished_cells"] == ranking["expected_cells"] == 9
    groups = {g["group"]: g for g in ranking["groups"]}
    assert groups["cross-validation"]["cases"] == 3  # subjects, not scans
    timed = groups["cross-validation at equal wall time"]["networks"]
    assert {r["network"] for r in timed} == set(networks)
    cell = json.loads(next((out / "cells" / "final" / "unet").glob("*.json")).read_text())
    assert [p["step"] for p in cell["curve"]] == [2, 4] and cell["step_seconds"] > 0
    assert {c["network"] for c in ranking["curves"]} == set(networks)
    assert all(s["curve"] for s in ranking["sweep"])


def test_a_best_rate_on_the_grid_edge_widens_the_grid(tmp_path):
    from medseg3d.experiments.compare import network_grid, next_rate
    from medseg3d.experiments.records import CaseScore, Cell

    assert [next_rate(r, 1) for r in (1e-3, 3e-3, 1e-2)] == [3e-3, 1e-2, 3e-2]
    assert next_rate(1e-3, -1) == 3e-4
    protocol = Protocol(dataset="d", networks=["unet"], steps=2, seeds=[0],
                        learning_rates=[1e-3, 3e-3], sweep_steps=2, widen_lr=True)

    def finish(lr: float, dice: float) -> None:
        score = CaseScore(case="v", test_set="validation", dice=dice, hd95_mm=1.0, nsd=1.0,
                          classes={})
        cell = Cell(stage="sweep", network="unet", options={}, learning_rate=lr,
                    weight_decay=1e-5, seed=0, fold=0, train_cases=[], parameters=1,
                    input_size=(8, 8, 8), gflops_per_forward=0.0, steps=2, train_seconds=1.0,
                    predict_seconds_per_case=0.1, device="cpu", cases=[score])
        path = cell_path(tmp_path, "sweep", "unet", lr, 1e-5, 0, 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(cell.model_dump_json())

    assert network_grid(protocol, tmp_path, "unet") == ([(1e-3, 1e-5), (3e-3, 1e-5)], False)
    finish(1e-3, 0.8)
    finish(3e-3, 0.9)  # best at the top: 1e-2 is tried next
    assert network_grid(protocol, tmp_path, "unet") == (
        [(1e-3, 1e-5), (3e-3, 1e-5), (1e-2, 1e-5)], False)
    finish(1e-2, 0.85)  # inside now: complete
    assert network_grid(protocol, tmp_path, "unet")[1]
    finish(1e-2, 0.95)
    finish(3e-2, 0.96)  # still the top after two more rates: the widening stops there
    rates = [lr for lr, _ in network_grid(protocol, tmp_path, "unet")[0]]
    assert rates == [1e-3, 3e-3, 1e-2, 3e-2]
    assert network_grid(protocol, tmp_path, "unet")[1]


def test_an_interrupted_cell_resumes_and_ends_as_an_uninterrupted_one(tmp_path):
    from safetensors.torch import load_file

    from medseg3d.config import NetworkConfig, PlanOverrides
    from medseg3d.experiments.compare import _train_cell
    from medseg3d.runs import RunFolder

    root = make_dataset(tmp_path / "data", num_cases=3, shape=(16, 16, 16), num_classes=2)
    protocol = Protocol(dataset=str(root), networks=["unet"], steps=4, seeds=[0], device="cpu",
                        augment="none", validation_cases=["case002"], curve_every=2,
                        plan_overrides=PlanOverrides(
                            patch_size=(16, 16, 16), spacing=(1.0, 1.0, 1.0)))
    network = NetworkConfig(name="unet", options={"filters": [4, 8]})

    def cell(run: Path, log) -> float:
        return _train_cell(protocol, network, 1e-3, 1e-5, 0, 4, root, run, True, log)

    class Stop(Exception):
        pass

    def stop_after_first_epoch(line: str) -> None:
        if "epoch 1" in line:
            raise Stop

    cell(tmp_path / "whole", lambda _: None)
    with pytest.raises(Stop):
        cell(tmp_path / "cut", stop_after_first_epoch)
    assert RunFolder(tmp_path / "cut").progress()[1] == 2  # half the steps, saved
    lines: list[str] = []
    assert cell(tmp_path / "cut", lines.append) > 0
    assert any("resumed after epoch 1 (step 2)" in line for line in lines)
    whole, cut = (load_file(RunFolder(tmp_path / r).weights("final")) for r in ("whole", "cut"))
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    cell(tmp_path / "cut", lines.append)  # a finished run (killed while testing) trains no more
    again = load_file(RunFolder(tmp_path / "cut").weights("final"))
    assert all(torch.equal(whole[k], again[k]) for k in whole)

    other = protocol.model_copy(update={"augment": "strong"})  # another config starts over
    lines.clear()
    _train_cell(other, network, 1e-3, 1e-5, 0, 4, root, tmp_path / "cut", True, lines.append)
    assert not any("resumed" in line for line in lines)
