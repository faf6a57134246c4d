"""benchmarks/throughput.py: its pure parts, without a model or a peer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_module import load

throughput = load("throughput")


def _case(tmp_path: Path, name: str) -> object:
    image = tmp_path / "imagesTr" / f"{name}_0000.nii.gz"
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(b"scan")
    return throughput.Case(name, "imagesTr", image, tmp_path / "labelsTr" / f"{name}.nii.gz")


def test_the_folder_holds_exactly_the_chosen_scans_as_links(tmp_path: Path) -> None:
    cases = [_case(tmp_path, "a"), _case(tmp_path, "b")]
    _case(tmp_path, "left_out")
    links = throughput.link_inputs(cases, tmp_path / "inputs")
    assert sorted(p.name for p in (tmp_path / "inputs").iterdir()) == ["a_0000.nii.gz", "b_0000.nii.gz"]
    assert all(p.is_symlink() and p.read_bytes() == b"scan" for p in links)
    assert [throughput.mask_name(p) for p in links] == ["a.nii.gz", "b.nii.gz"]


def test_options_default_to_two_threads_three_repeats_and_the_shipped_model() -> None:
    args = throughput.parse_args([])
    assert (args.threads, args.repeats, args.robex, args.model) == (2, 3, False, None)
    assert throughput.model_specs(args.model) == {"brainmask": "brainmask"}
    args = throughput.parse_args(["--model", "brainmask", "--model", "v3=runs/x",
                                  "--case", "a", "--case", "b"])
    assert throughput.model_specs(args.model) == {"brainmask": "brainmask", "v3": "runs/x"}
    assert args.case == ["a", "b"]
    with pytest.raises(SystemExit, match="deepbet"):
        throughput.model_specs(["deepbet=runs/x"])


def test_the_deepbet_job_pairs_each_scan_with_its_mask(tmp_path: Path) -> None:
    links = throughput.link_inputs([_case(tmp_path, "a")], tmp_path / "work" / "inputs")
    args = throughput.parse_args(["--threads", "3", "--robex"])
    methods = throughput.build_methods(args, links, tmp_path / "masks")
    assert [m.label for m in methods] == ["brainmask", "deepbet", "robex"]
    assert methods[0].commands[0][-6:] == ["-o", str(tmp_path / "masks" / "brainmask"), "--model",
                                           "brainmask", "--device", "cpu"]
    job = json.loads((tmp_path / "work" / "deepbet_job.json").read_text())
    assert job == {"inputs": [str(links[0])], "threads": 3,
                   "masks": [str(tmp_path / "masks" / "deepbet" / "a.nii.gz")]}
    assert methods[2].commands[0][-1] == str(tmp_path / "masks" / "robex" / "a.nii.gz")


def test_scans_per_hour_and_the_ratio_to_deepbet() -> None:
    assert throughput.scans_per_hour(8, 240.0) == 120.0
    methods = {"brainmask": {"scans": 2, "wall_s_median": 30.0, "scans_per_hour": 240.0,
                             "dice": {"a": 0.97, "b": 0.95}, "dice_rim": {"a": 0.96, "b": 0.96}},
               "deepbet": {"scans": 2, "wall_s_median": 60.0, "scans_per_hour": 120.0,
                           "dice": {"a": 0.96, "b": 0.94}, "dice_rim": {"a": 0.97, "b": 0.97}}}
    rows = throughput.summary_rows(methods)
    assert rows[2].startswith("| brainmask | 2 | 30.0 | 240.0 | 2.00x | 0.9600 ± ")
    assert rows[2].endswith("| 0.9600 |")
    assert rows[3].startswith("| deepbet | 2 | 60.0 | 120.0 | 1.00x | 0.9500 ± ")
    paired = throughput.paired_rows(methods, "dice")
    assert len(paired) == 1 and paired[0].startswith("- brainmask minus deepbet, dice: +0.0100")


def test_commands_are_shown_without_this_machines_paths() -> None:
    command = ["/x/.venv/bin/medseg3d", "predict", "/tmp/t1/inputs", "-o", "/x/runs/throughput/m"]
    display = {"/tmp/t1/inputs": "INPUTS", "/tmp/t1": "TMP", "/x/": ""}
    assert throughput.shown(command, display) == ".venv/bin/medseg3d predict INPUTS -o runs/throughput/m"
    assert throughput.shown(["python", "-c", throughput.DEEPBET], {}) == "python -c '<DEEPBET>'"


def test_masks_are_found_by_the_names_written(tmp_path: Path) -> None:
    (tmp_path / "a.nii.gz").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    assert throughput.found_masks(tmp_path) == {"a": tmp_path / "a.nii.gz"}
