"""The comparison report: seed means per case, groups kept apart, pairs on common seeds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from medseg3d.evaluation.statistics import mean_ci95
from medseg3d.experiments.ranking import CROSS_VALIDATION, GroupResult, Ranking, rank
from medseg3d.experiments.records import CaseScore, Cell, Fold, Protocol, cell_path
from medseg3d.experiments.report import markdown

FOLDS = [Fold(index=0, train=["c1", "c2"], test=["c0"], extra=True),
         Fold(index=1, train=["c0", "c2"], test=["c1"], extra=False),
         Fold(index=2, train=["c0", "c1"], test=["c2"], extra=False)]
# network -> seed -> case -> (Dice, HD95); network "b" has seed 0 only (a study in progress)
DICE = {"a": {0: {"c0": 0.9, "c1": 0.8, "c2": 0.7, "s0": 0.6, "s1": 0.5},
              1: {"c0": 0.7, "c1": 0.6, "c2": 0.5, "s0": 0.4, "s1": 0.3}},
        "b": {0: {"c0": 0.6, "c1": 0.6, "c2": 0.6, "s0": 0.9, "s1": 0.9}}}


def _cell(network: str, seed: int, fold: Fold) -> Cell:
    dice = DICE[network][seed]
    cases = [CaseScore(case=c, test_set="fold", dice=dice[c], nsd=dice[c] / 2,
                       hd95_mm=math.inf if (network, c) == ("b", "c2") else 10 * dice[c],
                       classes={}) for c in fold.test]
    if fold.extra:
        cases += [CaseScore(case=c, test_set="Stress", dice=dice[c], hd95_mm=1.0, nsd=0.5,
                            classes={}) for c in ("s0", "s1")]
    return Cell(stage="final", network=network, options={}, learning_rate=1e-3,
                weight_decay=1e-5, seed=seed, fold=fold.index, train_cases=fold.train,
                parameters=1000, input_size=(8, 8, 8), gflops_per_forward=0.1, steps=10,
                train_seconds=5.0, predict_seconds_per_case=0.1, device="cpu", cases=cases)


@pytest.fixture
def report(tmp_path: Path) -> tuple[Ranking, list[Cell]]:
    protocol = Protocol(dataset=str(tmp_path / "data"), networks=["a", "b"], steps=10,
                        seeds=[0, 1], num_folds=3, extra_tests=[str(tmp_path / "Stress")])
    (tmp_path / "folds.json").write_text(json.dumps([f.model_dump() for f in FOLDS]))
    for network, seeds in DICE.items():
        for seed in seeds:
            for fold in FOLDS:
                path = cell_path(tmp_path, "final", network, 1e-3, 1e-5, seed, fold.index)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(_cell(network, seed, fold).model_dump_json())
    return rank(protocol, tmp_path)


def _group(ranking: Ranking, name: str) -> GroupResult:
    return next(g for g in ranking.groups if g.group == name)


def test_cross_validation_scores_each_case_by_its_seed_mean(report) -> None:
    ranking, cells = report
    assert (ranking.finished_cells, ranking.expected_cells, len(cells)) == (9, 12, 9)
    group = _group(ranking, CROSS_VALIDATION)
    assert group.cases == 3  # the stress variants never enter it
    a = next(r for r in group.networks if r.network == "a")
    expected = mean_ci95([0.8, 0.7, 0.6])  # per case, the mean of seeds 0 and 1
    assert (a.dice.mean, a.dice.ci95, a.dice.n) == (pytest.approx(expected.mean),
                                                    pytest.approx(expected.ci95), 3)
    assert a.seed_dice == pytest.approx({0: 0.8, 1: 0.6})
    assert (a.worst_case, a.worst_dice) == ("c2", pytest.approx(0.6))


def test_groups_rank_apart_and_count_hd95_failures(report) -> None:
    ranking, _ = report
    cv, stress = _group(ranking, CROSS_VALIDATION), _group(ranking, "Stress")
    assert [r.network for r in cv.networks] == ["a", "b"]
    assert [r.network for r in stress.networks] == ["b", "a"]
    assert stress.cases == 2
    b = next(r for r in cv.networks if r.network == "b")
    assert b.hd95_failures == 1 and b.hd95_mm.n == 2  # the infinite case is counted, not averaged


def test_pairs_use_only_the_seeds_both_networks_have(report) -> None:
    ranking, _ = report
    pair = next(p for p in _group(ranking, CROSS_VALIDATION).pairs if p.metric == "dice")
    # seed 0 only: a's 0.9, 0.8, 0.7 against b's 0.6 each (a's seed 1 would halve the gap)
    assert (pair.a, pair.b) == ("a", "b")
    assert pair.difference.mean == pytest.approx(0.2)
    assert (pair.difference.wins, pair.difference.losses) == (3, 0)
    assert "| a | b | dice | +0.2000" in markdown(ranking)


def test_verdicts_follow_the_rule():
    from medseg3d.evaluation.statistics import PairedDifference
    from medseg3d.experiments.claims import Claim, verdicts
    from medseg3d.experiments.ranking import GroupResult, PairResult

    def pair(a, b, mean, p):
        d = PairedDifference(mean=mean, ci95=0.01, n=6, wins=6 if mean > 0 else 0,
                             losses=0 if mean > 0 else 6, p_wilcoxon=p)
        return PairResult(a=a, b=b, metric="dice", difference=d)

    group = GroupResult(group="cross-validation", cases=6, networks=[], pairs=[
        pair("a", "m", 0.05, 0.03), pair("b", "m", 0.01, 0.3), pair("a", "p", -0.02, 0.03)])
    claims = [Claim(part="1", statement="a beats m", beats=[("a", "m")]),
              Claim(part="2", statement="a and b beat m", beats=[("a", "m"), ("b", "m")]),
              Claim(part="3", statement="p beats a", beats=[("p", "a")]),  # stored as a - p
              Claim(part="4", statement="x beats m", beats=[("x", "m")])]  # x not in the study
    words = {v.part: v.verdict for v in verdicts(group, claims)}
    assert words == {"1": "supported", "2": "cannot tell", "3": "supported"}
    group = group.model_copy(update={"pairs": [pair("m", "p", 0.04, 0.03)]})
    assert verdicts(group, [Claim(part="3", statement="p beats m", beats=[("p", "m")])]
                    )[0].verdict == "contradicted"
