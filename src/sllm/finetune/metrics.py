"""STS scores: Spearman and Pearson correlation (`scipy.stats`, ×100 as in the KorSTS and KLUE
papers). Constant predictions score NaN rather than raising, so one bad epoch does not stop a run.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats


@dataclass
class StsScores:
    spearman: float
    pearson: float
    n: int


def sts_scores(predicted: Sequence[float], gold: Sequence[float]) -> StsScores:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        spearman = float(stats.spearmanr(predicted, gold).statistic)
        pearson = float(stats.pearsonr(predicted, gold).statistic)
    return StsScores(100.0 * spearman, 100.0 * pearson, len(gold))
