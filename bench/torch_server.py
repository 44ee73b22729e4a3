"""The PyTorch + FastAPI reference server for the serving benchmark (never used by tests).

It answers the same KServe v2 JSON request as `flywheel-serving serve` with the same work per row: parse the
JSON, apply the schema's transforms (hash bucket, bucketize, log1p, cross), look up the embeddings and run the
same DeepFM (first-order terms, FM pairwise term, MLP). Weights are random: only the cost is compared.

    python bench/torch_server.py --schema schema.json --port 9000 --dim 16 --hidden 256,128
"""

import argparse
import bisect
import math

import torch
import uvicorn
import xxhash
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from torch import nn

SEPARATOR = "\x1f"


class Encoder:
    def __init__(self, schema):
        self.features = schema["features"]
        self.categorical = []
        self.numeric = []
        for feature in self.features:
            kind, params = next(iter(feature.get("transform", {"none": {}}).items()))
            if kind in ("hashBucket", "cross"):
                self.categorical.append((feature["name"], kind, params, params["buckets"] + 1))
            elif kind == "bucketize":
                self.categorical.append((feature["name"], kind, params, len(params["boundaries"]) + 2))
            else:
                self.numeric.append((feature["name"], kind, params))
        self.offsets = []
        total = 0
        for _, _, _, rows in self.categorical:
            self.offsets.append(total)
            total += rows
        self.rows = total

    def encode(self, columns, n):
        ids = []
        dense = []
        for i in range(n):
            row_ids = []
            for (name, kind, params, _), offset in zip(self.categorical, self.offsets):
                if kind == "hashBucket":
                    index = xxhash.xxh3_64_intdigest(f"{name}{SEPARATOR}{columns[name][i]}".encode()) % params["buckets"]
                elif kind == "cross":
                    joined = SEPARATOR.join(str(columns[f][i]) for f in params["features"])
                    index = xxhash.xxh3_64_intdigest(f"{name}{SEPARATOR}{joined}".encode()) % params["buckets"]
                else:
                    index = bisect.bisect_right(params["boundaries"], float(columns[name][i]))
                row_ids.append(offset + index)
            ids.append(row_ids)
            row_dense = []
            for name, kind, params in self.numeric:
                x = float(columns[name][i])
                if not math.isfinite(x):
                    raise ValueError(f"input `{name}`: value is not a finite number")
                row_dense.append(math.log1p(max(x, 0.0)) if kind == "log1p" else x)
            dense.append(row_dense)
        return torch.tensor(ids, dtype=torch.long), torch.tensor(dense, dtype=torch.float32)


class DeepFm(nn.Module):
    def __init__(self, rows, fields, numeric, dim, hidden):
        super().__init__()
        self.first = nn.Embedding(rows, 1)
        self.factors = nn.Embedding(rows, dim)
        self.linear = nn.Linear(max(numeric, 1), 1)
        layers = []
        width = fields * dim + numeric
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, ids, dense):
        factors = self.factors(ids)
        square_of_sum = factors.sum(1) ** 2
        sum_of_squares = (factors * factors).sum(1)
        pairwise = 0.5 * (square_of_sum - sum_of_squares).sum(1, keepdim=True)
        x = torch.cat([factors.flatten(1), dense], 1)
        logit = self.first(ids).sum(1) + self.linear(dense) + pairwise + self.mlp(x)
        return torch.sigmoid(logit).squeeze(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--schema", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--hidden", default="256,128")
    args = parser.parse_args()
    import json

    with open(args.schema) as f:
        encoder = Encoder(json.load(f))
    torch.set_num_threads(1)
    hidden = [int(h) for h in args.hidden.split(",") if h]
    model = DeepFm(encoder.rows, len(encoder.categorical), len(encoder.numeric), args.dim, hidden).eval()
    app = FastAPI()

    @app.get("/v2/health/ready")
    async def ready():
        return {"ready": True}

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request):
        body = await request.json()
        columns = {tensor["name"]: tensor["data"] for tensor in body["inputs"]}
        n = body["inputs"][0]["shape"][0]
        try:
            ids, dense = encoder.encode(columns, n)
        except (KeyError, ValueError) as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        with torch.inference_mode():
            scores = model(ids, dense).tolist()
        return {
            "model_name": name,
            "id": body.get("id", ""),
            "outputs": [{"name": "score", "datatype": "FP64", "shape": [n], "data": scores}],
        }

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
