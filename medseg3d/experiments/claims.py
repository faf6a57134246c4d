"""The seed's claim in three parts, and each part's verdict from the paired tests over subjects.

A part names comparisons "a beats b" between networks of the study. Its verdict, per test group:

* **supported**: every comparison goes a's way with Wilcoxon p < ``ALPHA``;
* **contradicted**: at least one goes b's way with p < ``ALPHA``;
* **cannot tell**: otherwise (too few subjects, or differences inside the noise).

The rule is fixed before the results, so that the words follow from the statistics and not
from reading them. With six subjects a two-sided Wilcoxon test reaches p = 0.031 only when all
six go one way.
"""

from __future__ import annotations

from typing import Literal

from medseg3d.evaluation.statistics import PairedDifference
from medseg3d.experiments.ranking import GroupResult
from medseg3d.experiments.records import Record

__all__ = ["ALPHA", "CLAIMS", "Claim", "Verdict", "verdicts"]

ALPHA = 0.05
Word = Literal["supported", "contradicted", "cannot tell"]


class Claim(Record):
    """One part of the claim: ``beats`` lists (a, b) pairs where a should score above b."""

    part: str
    statement: str
    beats: list[tuple[str, str]]


class Evidence(Record):
    """One comparison of a verdict: a - b in Dice over the group's subjects."""

    a: str
    b: str
    difference: PairedDifference


class Verdict(Record):
    part: str
    statement: str
    group: str
    verdict: Word
    evidence: list[Evidence]


# Round 3 (issue #29): the Mixer has a patch embedding; the AS-MLP, the U-Net and PFSeg have
# none. 2a and 2b are the stem controls: the AS-MLP without any spatial convolution against the
# Mixer, and the AS-MLP against a Mixer with the AS-MLP's convolution stem and decoder.
CLAIMS = [
    Claim(part="1", statement="MLPs that need a patch embedding (MLP-Mixer) do poorly at dense "
          "3D prediction", beats=[("asmlp3d_1m", "mixer3d_1m"), ("unet_1m", "mixer3d_1m"),
                                  ("patchfree5_1m", "mixer3d_1m")]),
    Claim(part="2", statement="An axial-shifted MLP (AS-MLP), with no patch embedding, beats "
          "them", beats=[("asmlp3d_1m", "mixer3d_1m")]),
    Claim(part="2a", statement="... with no spatial convolution anywhere but its shifts",
          beats=[("asmlp3d_pointstem_1m", "mixer3d_1m")]),
    Claim(part="2b", statement="... against a Mixer given the AS-MLP's convolution stem and "
          "decoder", beats=[("asmlp3d_1m", "mixer3d_convstem_1m")]),
    Claim(part="3", statement="Patch-free CNNs (PFSeg) still do best",
          beats=[("patchfree5_1m", n) for n in ("unet_1m", "asmlp3d_1m", "mixer3d_1m",
                                                "asmlp3d_pointstem_1m", "mixer3d_convstem_1m")]),
]


def _dice_difference(group: GroupResult, a: str, b: str) -> PairedDifference | None:
    """a - b in Dice from the group's pairs (stored in name order), or None if not paired."""
    for pair in group.pairs:
        if pair.metric != "dice":
            continue
        if (pair.a, pair.b) == (a, b):
            return pair.difference
        if (pair.a, pair.b) == (b, a):
            d = pair.difference
            return d.model_copy(update={"mean": -d.mean, "wins": d.losses, "losses": d.wins})
    return None


def verdicts(group: GroupResult, claims: list[Claim] = CLAIMS) -> list[Verdict]:
    """Each claim whose networks were all paired in ``group``, with its verdict."""
    out = []
    for claim in claims:
        found = [(a, b, _dice_difference(group, a, b)) for a, b in claim.beats]
        if any(d is None for _, _, d in found):
            continue
        evidence = [Evidence(a=a, b=b, difference=d) for a, b, d in found if d is not None]
        significant = [e for e in evidence if e.difference.p_wilcoxon < ALPHA]
        if any(e.difference.mean < 0 for e in significant):
            word: Word = "contradicted"
        elif len(significant) == len(evidence) and all(e.difference.mean > 0 for e in evidence):
            word = "supported"
        else:
            word = "cannot tell"
        out.append(Verdict(part=claim.part, statement=claim.statement, group=group.group,
                           verdict=word, evidence=evidence))
    return out
