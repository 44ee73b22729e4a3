#!/usr/bin/env python3
"""Writes transforms.json: inputs and outputs of every transform computed independently in Python, the way a
non-Rust consumer (the PyTorch reference) encodes features. Needs `xxhash` and `numpy`:
    python3 -m pip install xxhash numpy && python3 make_transform_golden.py
"""
import json
import math

import numpy as np
import xxhash

SEP = "\x1f"


def canonical(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return value  # strings; the golden cases use no floats as hash input


def hash_bucket(name, value, buckets):
    if value is None:
        return buckets
    return xxhash.xxh3_64_intdigest((name + SEP + canonical(value)).encode()) % buckets


def cross(names, values, buckets):
    if any(v is None for v in values):
        return buckets
    key = SEP.join(n + SEP + canonical(v) for n, v in zip(names, values))
    return xxhash.xxh3_64_intdigest(key.encode()) % buckets


def bucketize(boundaries, x):
    if x is None:
        return len(boundaries) + 1
    return int(np.searchsorted(boundaries, x, side="right"))


def main():
    cases = []
    for name, value, buckets in [
        ("user_id", 42, 100000), ("user_id", "42", 100000), ("item_id", 42, 100000), ("user_id", 0, 7),
        ("device", "mobile", 1000), ("gender", "f", 1000), ("flag", True, 10), ("user_id", None, 100000),
        ("user_id", "ünïcødé", 1 << 40), ("user_id", -17, 97),
    ]:
        cases.append({"transform": {"hashBucket": {"buckets": buckets}}, "feature": name, "value": value,
                      "expected": {"categorical": hash_bucket(name, value, buckets)}})
    boundaries = [18.0, 25.0, 35.0, 45.0]
    for x in [0, 18, 24.999, 25, 100, None]:
        cases.append({"transform": {"bucketize": {"boundaries": boundaries}}, "feature": "age", "value": x,
                      "expected": {"categorical": bucketize(boundaries, x)}})
    for x in [0.0, 1.0, 99.5, -3.0, None]:
        expected = 0.0 if x is None else math.log1p(max(x, 0.0))
        cases.append({"transform": {"log1p": {}}, "feature": "price", "value": x, "expected": {"numeric": expected}})
    for x in [10.0, 14.0, 7.5, None]:
        expected = 0.0 if x is None else (x - 10.0) / 2.0
        cases.append({"transform": {"standardize": {"mean": 10.0, "std": 2.0}}, "feature": "x", "value": x,
                      "expected": {"numeric": expected}})
    crosses = []
    for values in [[3, 25], ["u1", "mobile"], [3, None]]:
        crosses.append({"features": ["category", "age"], "buckets": 1000, "values": values,
                        "expected": cross(["category", "age"], values, 1000)})
    with open("transforms.json", "w") as out:
        json.dump({"cases": cases, "crosses": crosses}, out, ensure_ascii=False, indent=1)
        out.write("\n")


if __name__ == "__main__":
    main()
