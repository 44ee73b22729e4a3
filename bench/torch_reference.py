"""PyTorch reference of Flywheel's CTR models, for benchmarks only.

Trains the same architecture with the same hyperparameters on exactly the features Flywheel's trainer sees
(the `flywheel-trainer encode` output: `c<i>` bucket of categorical field i, `x<j>` transformed numeric input,
`label`, `group`), the way a careful PyTorch user would write it: embedding tables with sparse gradients and
sparse Adagrad (first-order weights start at 0, factors at N(0, 0.01)), the dense part (numeric linear term with
the global bias, FM pairwise term for DeepFM, ReLU MLP and head) with Adam. Prints one JSON line: samples/s of
the training loop, AUC, GAUC, log loss and calibration on the eval set.
"""

import argparse
import json
import time

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn


def load(path):
    table = pq.read_table(path)
    names = table.column_names
    cat = np.stack([table[n].to_numpy().astype(np.int64) for n in names if n.startswith("c")], axis=1)
    numeric_names = [n for n in names if n.startswith("x")]
    num = (
        np.stack([table[n].to_numpy().astype(np.float32) for n in numeric_names], axis=1)
        if numeric_names
        else np.zeros((len(cat), 0), np.float32)
    )
    return cat, num, table["label"].to_numpy().astype(np.float32), table["group"].to_numpy()


class CtrModel(nn.Module):
    def __init__(self, rows, fields, numeric, dim, hidden, architecture):
        super().__init__()
        self.first_order = nn.Embedding(rows, 1, sparse=True)
        nn.init.zeros_(self.first_order.weight)
        self.numeric = nn.Linear(max(numeric, 1), 1)
        self.has_numeric = numeric > 0
        self.factors = None
        self.fm = architecture == "deepfm"
        if architecture != "logistic":
            self.factors = nn.Embedding(rows, dim, sparse=True)
            nn.init.normal_(self.factors.weight, 0.0, 0.01)
            layers, width = [], fields * dim + numeric
            for size in hidden:
                layers += [nn.Linear(width, size), nn.ReLU()]
                width = size
            layers.append(nn.Linear(width, 1))
            self.mlp = nn.Sequential(*layers)

    def forward(self, keys, numeric):
        numeric_input = numeric if self.has_numeric else torch.zeros(len(keys), 1, device=keys.device)
        logit = self.first_order(keys).sum(dim=(1, 2)) + self.numeric(numeric_input).squeeze(1)
        if self.factors is not None:
            v = self.factors(keys)
            if self.fm:
                logit = logit + 0.5 * (v.sum(1).pow(2) - v.pow(2).sum(1)).sum(1)
            x = torch.cat([v.flatten(1), numeric], dim=1)
            logit = logit + self.mlp(x).squeeze(1)
        return logit


def auc(scores, labels):
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(first[counts > 1], counts[counts > 1]):
        ranks[order[start : start + count]] = start + (count + 1) / 2
    positives = labels.sum()
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return None
    return (ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives)


def gauc(scores, labels, groups):
    total, weight = 0.0, 0
    order = np.argsort(groups, kind="mergesort")
    boundaries = np.flatnonzero(np.diff(groups[order])) + 1
    for index in np.split(order, boundaries):
        value = auc(scores[index], labels[index])
        if value is not None:
            total += value * len(index)
            weight += len(index)
    return total / weight if weight else None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--architecture", default="deepfm")
    parser.add_argument("--embedding-dim", type=int, default=16)
    parser.add_argument("--hidden", default="400,400")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=0.001)
    parser.add_argument("--sparse-learning-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N], as flywheel-trainer's --device")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    # The sparse gradients come from nn.Embedding itself; re-checking them every step only costs time.
    torch.sparse.check_sparse_tensor_invariants.disable()
    if args.threads:
        torch.set_num_threads(args.threads)

    train_cat, train_num, train_y, _ = load(args.train)
    eval_cat, eval_num, eval_y, eval_groups = load(args.eval)
    fields = train_cat.shape[1]
    sizes = np.maximum(train_cat.max(axis=0), eval_cat.max(axis=0)) + 1
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    train_keys = torch.from_numpy(train_cat + offsets).to(device)
    eval_keys = torch.from_numpy(eval_cat + offsets).to(device)
    hidden = [int(h) for h in args.hidden.split(",") if h] if args.architecture != "logistic" else []
    model = CtrModel(int(sizes.sum()), fields, train_num.shape[1], args.embedding_dim, hidden, args.architecture)
    model.to(device)
    sparse = [model.first_order.weight] + ([model.factors.weight] if model.factors is not None else [])
    dense = [p for p in model.parameters() if all(p is not s for s in sparse)]
    sparse_optimizer = torch.optim.Adagrad(sparse, lr=args.sparse_learning_rate, eps=1e-10)
    dense_optimizer = torch.optim.Adam(dense, lr=args.learning_rate)
    loss_fn = nn.BCEWithLogitsLoss()
    train_num_t, train_y_t = torch.from_numpy(train_num).to(device), torch.from_numpy(train_y).to(device)

    started = time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(len(train_y), device=device)
        for start in range(0, len(order), args.batch_size):
            batch = order[start : start + args.batch_size]
            loss = loss_fn(model(train_keys[batch], train_num_t[batch]), train_y_t[batch])
            sparse_optimizer.zero_grad()
            dense_optimizer.zero_grad()
            loss.backward()
            sparse_optimizer.step()
            dense_optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started

    with torch.no_grad():
        logits = torch.cat(
            [
                model(eval_keys[i : i + 4096], torch.from_numpy(eval_num[i : i + 4096]).to(device))
                for i in range(0, len(eval_y), 4096)
            ]
        )
    p = torch.sigmoid(logits).double().cpu().numpy()
    clipped = np.clip(p, 1e-15, 1 - 1e-15)
    print(
        json.dumps(
            {
                "samplesPerSecond": len(train_y) * args.epochs / seconds,
                "trainSeconds": seconds,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "metrics": {
                    "auc": auc(p, eval_y),
                    "gauc": gauc(p, eval_y, eval_groups),
                    "logLoss": float(-np.mean(eval_y * np.log(clipped) + (1 - eval_y) * np.log(1 - clipped))),
                    "calibration": float(p.sum() / eval_y.sum()),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
