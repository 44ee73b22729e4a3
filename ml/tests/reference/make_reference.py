#!/usr/bin/env python3
"""Writes metrics.json: fixed input vectors and the values scikit-learn, scipy and numpy give for them.

Run from this directory with scikit-learn, scipy and numpy installed:
    python3 -m pip install scikit-learn scipy numpy && python3 make_reference.py
The Rust tests (ml/tests/metrics_reference.rs) must match every value to 1e-9.
"""
import json
import platform

import numpy as np
import scipy
import sklearn
from scipy.stats import ks_2samp
from sklearn.metrics import log_loss, roc_auc_score

PSI_EMPTY_BIN_SHARE = 1e-6


def psi(expected, actual, bins):
    """PSI as flywheel_ml::metrics::psi defines it: expected's quantile edges, right-closed search."""
    edges = np.quantile(expected, [i / bins for i in range(1, bins)])  # linear interpolation

    def shares(values):
        counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=bins)
        return np.maximum(counts / len(values), PSI_EMPTY_BIN_SHARE)

    e, a = shares(expected), shares(actual)
    return float(np.sum((a - e) * np.log(a / e)))


def gauc(scores, labels, groups):
    total, weight = 0.0, 0
    for group in np.unique(groups):
        mask = groups == group
        if len(np.unique(labels[mask])) < 2:
            continue
        total += roc_auc_score(labels[mask], scores[mask]) * mask.sum()
        weight += mask.sum()
    return total / weight


def case(rng, name, n, groups, decimals):
    labels = rng.random(n) < 0.3
    # Scores correlated with labels, rounded to force ties.
    scores = np.clip(rng.normal(0.35 + 0.2 * labels, 0.15), 0.001, 0.999).round(decimals)
    group_ids = rng.integers(0, groups, n)
    other = rng.normal(0.1, 1.2, n // 2 + 7)
    return {
        "name": name,
        "scores": scores.tolist(),
        "labels": labels.tolist(),
        "groups": group_ids.tolist(),
        "other": other.tolist(),
        "auc": float(roc_auc_score(labels, scores)),
        "gauc": float(gauc(scores, labels, group_ids)),
        "log_loss": float(log_loss(labels, scores)),
        "calibration": float(scores.sum() / labels.sum()),
        "psi_10": psi(scores, other, 10),
        "psi_4": psi(other, scores, 4),
        "ks": float(ks_2samp(scores, other).statistic),
    }


def main():
    rng = np.random.default_rng(20261123)
    cases = [
        case(rng, "small-many-ties", 60, 5, 1),
        case(rng, "medium", 500, 40, 3),
        case(rng, "large-few-ties", 4000, 300, 6),
    ]
    produced_by = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
    }
    with open("metrics.json", "w") as out:
        json.dump({"produced_by": produced_by, "cases": cases}, out)
        out.write("\n")


if __name__ == "__main__":
    main()
