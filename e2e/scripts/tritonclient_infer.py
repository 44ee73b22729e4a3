"""Scores rows with the off-the-shelf Triton client (tritonclient, from PyPI) over gRPC and HTTP, to show that
flywheel-serving answers the Open Inference Protocol as KServe/Triton clients expect.

    python tritonclient_infer.py GRPC_PORT HTTP_PORT ROWS.json  →  {"grpc": [...], "http": [...], "metadata": {...}}
"""

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

INTS = ["user_id", "item_id", "category", "age", "hour"]
STRINGS = ["gender", "device"]


def inputs(module, rows, binary):
    n = len(rows)
    tensors = []
    for name in INTS:
        tensor = module.InferInput(name, [n], "INT64")
        data = np.array([row[name] for row in rows], dtype=np.int64)
        tensor.set_data_from_numpy(data, **binary)
        tensors.append(tensor)
    for name in STRINGS:
        tensor = module.InferInput(name, [n], "BYTES")
        data = np.array([row[name].encode() for row in rows], dtype=np.object_)
        tensor.set_data_from_numpy(data, **binary)
        tensors.append(tensor)
    price = module.InferInput("price", [n], "FP64")
    price.set_data_from_numpy(np.array([row["price"] for row in rows], dtype=np.float64), **binary)
    tensors.append(price)
    return tensors


def main():
    grpc_port, http_port, rows_path = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(rows_path) as f:
        rows = json.load(f)
    grpc = grpcclient.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")
    assert grpc.is_server_live() and grpc.is_server_ready() and grpc.is_model_ready("ctr")
    metadata = grpc.get_model_metadata("ctr", as_json=True)
    grpc_result = grpc.infer("ctr", inputs(grpcclient, rows, {}), request_id="triton-grpc")
    http = httpclient.InferenceServerClient(url=f"127.0.0.1:{http_port}")
    assert http.is_server_live() and http.is_model_ready("ctr")
    http_result = http.infer(
        "ctr",
        inputs(httpclient, rows, {"binary_data": False}),
        outputs=[httpclient.InferRequestedOutput("score", binary_data=False)],
        request_id="triton-http",
    )
    print(json.dumps({
        "grpc": grpc_result.as_numpy("score").tolist(),
        "http": http_result.as_numpy("score").tolist(),
        "metadata": metadata,
    }))


if __name__ == "__main__":
    main()
