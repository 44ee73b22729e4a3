"""scikit-learn references for the model-quality benchmark, on exactly the features Flywheel's trainer sees.

Reads the `flywheel-trainer encode` output of the train and eval splits (`c<i>` bucket of categorical field i,
`x<j>` transformed numeric input, `label`, `group`), one-hot encodes the buckets, and fits the two models a
tabular practitioner reaches for first: `LogisticRegression` (L2, lbfgs, run to convergence) and
`HistGradientBoostingClassifier` (defaults, categorical fields as native categories). Prints one JSON line per
model with AUC, GAUC, LogLoss and calibration (Σ predicted / Σ positive) on eval, computed as Flywheel does.
"""

import argparse
import json
import time

import numpy as np
import pyarrow.parquet as pq
from scipy import sparse
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.preprocessing import OneHotEncoder


def load(path):
    table = pq.read_table(path)
    names = table.column_names
    categorical = [n for n in names if n.startswith("c")]
    numeric = [n for n in names if n.startswith("x")]
    cat = np.stack([table[n].to_numpy().astype(np.int64) for n in categorical], axis=1) if categorical else None
    num = np.stack([table[n].to_numpy().astype(np.float64) for n in numeric], axis=1) if numeric else None
    return cat, num, table["label"].to_numpy() > 0.5, table["group"].to_numpy()


def gauc(scores, labels, groups):
    weighted, weight = 0.0, 0
    order = np.argsort(groups, kind="stable")
    boundaries = np.flatnonzero(np.diff(groups[order])) + 1
    for rows in np.split(order, boundaries):
        if labels[rows].all() or not labels[rows].any():
            continue
        weighted += roc_auc_score(labels[rows], scores[rows]) * len(rows)
        weight += len(rows)
    return weighted / weight if weight else None


def metrics(probabilities, labels, groups):
    return {
        "auc": roc_auc_score(labels, probabilities),
        "gauc": gauc(probabilities, labels, groups),
        "logLoss": log_loss(labels, probabilities),
        "calibration": float(probabilities.sum() / labels.sum()),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    train_cat, train_num, train_labels, _ = load(args.train)
    eval_cat, eval_num, eval_labels, eval_groups = load(args.eval)

    blocks_train, blocks_eval = [], []
    if train_cat is not None:
        encoder = OneHotEncoder(handle_unknown="ignore")
        blocks_train.append(encoder.fit_transform(train_cat))
        blocks_eval.append(encoder.transform(eval_cat))
    if train_num is not None:
        blocks_train.append(sparse.csr_matrix(train_num))
        blocks_eval.append(sparse.csr_matrix(eval_num))
    x_train, x_eval = sparse.hstack(blocks_train).tocsr(), sparse.hstack(blocks_eval).tocsr()
    started = time.perf_counter()
    logistic = LogisticRegression(max_iter=5000).fit(x_train, train_labels)
    seconds = time.perf_counter() - started
    result = metrics(logistic.predict_proba(x_eval)[:, 1], eval_labels, eval_groups)
    print(json.dumps({"model": "LogisticRegression", "seconds": seconds, "metrics": result}))

    dense_train = np.hstack([a for a in (train_cat, train_num) if a is not None])
    dense_eval = np.hstack([a for a in (eval_cat, eval_num) if a is not None])
    fields = 0 if train_cat is None else train_cat.shape[1]
    boosting = HistGradientBoostingClassifier(
        categorical_features=list(range(fields)) or None, random_state=args.seed
    )
    # Native categories need codes below 255 per field: remap each field's buckets to dense codes.
    for field in range(fields):
        codes, inverse = np.unique(dense_train[:, field], return_inverse=True)
        lookup = dict(zip(codes.tolist(), range(len(codes))))
        dense_train[:, field] = inverse
        dense_eval[:, field] = [lookup.get(v, -1) for v in dense_eval[:, field].tolist()]
    dense_eval = dense_eval.astype(np.float64)
    for field in range(fields):
        dense_eval[dense_eval[:, field] < 0, field] = np.nan
    started = time.perf_counter()
    boosting.fit(dense_train.astype(np.float64), train_labels)
    seconds = time.perf_counter() - started
    result = metrics(boosting.predict_proba(dense_eval)[:, 1], eval_labels, eval_groups)
    print(json.dumps({"model": "HistGradientBoosting", "seconds": seconds, "metrics": result}))


if __name__ == "__main__":
    main()
