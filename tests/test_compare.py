"""``medseg3d compare``: four networks, one budget, one held-out set; JSON, CSV and figures."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from synthetic import make_dataset
from typer.testing import CliRunner

from medseg3d.cli import app
from medseg3d.experiments.compare import parse_budget

runner = CliRunner()
NETWORKS = ["unet", "asmlp3d", "patchfree", "mixer3d"]
# Tiny widths so that one training epoch and one prediction take about a second each.
TINY_OPTIONS = ["unet.filters=[4,8]", "asmlp3d.embed_dim=4", "asmlp3d.depths=[1,1]",
                "patchfree.filters=[4,8]", "mixer3d.dim=16", "mixer3d.depth=1",
                "mixer3d.patch_size=4"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: small networks run faster so on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def dataset_with_test_case(tmp_path):
    """Three training cases and one held-out case in imagesTs/labelsTs, annotated for 'blob' only."""
    root = make_dataset(tmp_path / "data", num_cases=4, shape=(16, 16, 16), num_classes=3)
    for kind, name in (("images", "case003_0000.nii.gz"), ("labels", "case003.nii.gz")):
        (root / f"{kind}Ts").mkdir()
        shutil.move(root / f"{kind}Tr" / name, root / f"{kind}Ts" / name)
    spec = json.loads((root / "dataset.json").read_text())
    spec.update(numTraining=3, cases={"case003": {"annotated": ["blob"]}})
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


def test_compare_writes_rows_for_every_network_and_the_figures(dataset_with_test_case, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", dataset_with_test_case, "--models", ",".join(NETWORKS), "--budget", "0.6s",
            "-o", out, "--patch-size", "16,16,16", "--spacing", "1,1,1", "--iterations", "1",
            "--device", "cpu", "--augment", "none"]
    for option in TINY_OPTIONS:
        args += ["--option", option]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    comparison = json.loads((out / "comparison.json").read_text())
    assert [r["network"] for r in comparison["rows"]] == NETWORKS
    assert comparison["test_split"] == "imagesTs" and comparison["test_cases"] == ["case003"]
    for row in comparison["rows"]:
        assert row["epochs"] >= 1 and row["parameters"] > 0
        assert set(row["classes"]) == {"blob"}  # the test case is annotated for blob only
        assert 0.0 <= row["mean_dice"] <= 1.0 and row["predict_seconds_per_case"] > 0
    # the fixed-size network was given the shared patch as its input size
    assert comparison["rows"][3]["options"]["input_size"] == [16, 16, 16]
    for run in NETWORKS:
        plan = json.loads((out / "runs" / run / "plan.json").read_text())
        assert plan["patch_size"] == [16, 16, 16] and plan["spacing"] == [1.0, 1.0, 1.0]
    assert len((out / "comparison.csv").read_text().splitlines()) == 1 + len(NETWORKS)
    for figure in ("comparison.png", "slices.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second comparison into the same folder must not silently retrain over the first
    again = runner.invoke(app, [str(a) for a in [*args[:3], "unet", *args[4:-2 * len(TINY_OPTIONS)],
                                                 "--option", TINY_OPTIONS[0]]])
    assert again.exit_code == 1 and "--reuse-runs" in again.output


@pytest.mark.parametrize("text, minutes", [("20m", 20.0), ("90s", 1.5), ("1.5h", 90.0),
                                           ("7", 7.0), ("2 min", 2.0)])
def test_parse_budget(text: str, minutes: float) -> None:
    assert parse_budget(text) == pytest.approx(minutes)


@pytest.mark.parametrize("text", ["", "0m", "-3m", "ten minutes", "5d"])
def test_bad_budgets_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_budget(text)
