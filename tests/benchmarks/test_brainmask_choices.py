"""benchmarks/brainmask_choices.py: folds parse, and each fold (subject) weighs once in the choice."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from benchmark_module import load

choices = load("brainmask_choices")


def test_folds_come_from_the_positional_model_or_from_fold_pairs() -> None:
    args = argparse.Namespace(model="m", test=[Path("a"), Path("b")], fold=["r1=x", "r2=y"])
    assert choices.parse_folds(args) == [("m", [Path("a"), Path("b")]), ("r1", [Path("x")]),
                                         ("r2", [Path("y")])]
    with pytest.raises(SystemExit, match="MODEL=IMAGES"):
        choices.parse_folds(argparse.Namespace(model=None, test=[], fold=["r1"]))
    with pytest.raises(SystemExit):
        choices.parse_folds(argparse.Namespace(model="m", test=[], fold=[]))


def test_a_fold_with_many_variants_counts_once() -> None:
    # fold a: 3 variants at 0.9 under candidate (0.5, False); fold b: one case at 0.5
    rows = [{"model": "a", "threshold": 0.5, "brain_rule": False, "tta": False, "dice": 0.9}] * 3
    rows += [{"model": "b", "threshold": 0.5, "brain_rule": False, "tta": False, "dice": 0.5}]
    assert choices.fold_means(rows, [(0.5, False, False)]) == {(0.5, False, False): pytest.approx(0.7)}
