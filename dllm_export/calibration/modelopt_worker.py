"""Run NVIDIA ModelOpt's ONNX PTQ inside ModelOpt's own environment.

    <modelopt venv>/bin/python modelopt_worker.py REQUEST.json

This file is executed by path, never imported by dllm_export: it runs under the ModelOpt
environment's Python (onnx 1.21, onnxruntime-gpu), which does not have dllm_export. It reads
one JSON request, writes the quantised graph, and prints one JSON line with what it did.

Request keys: onnx_path, output_path, mode (int8|fp8|int4), method, calibration (an .npz of
input_ids and attention_mask, calibration states stacked on the batch axis),
nodes_to_exclude, high_precision_dtype.
"""

import json
import sys
import time


def main(request_path: str) -> None:
    import numpy as np
    from modelopt.onnx.quantization import quantize

    request = json.loads(open(request_path, encoding="utf-8").read())
    data = np.load(request["calibration"])
    started = time.perf_counter()
    quantize(
        request["onnx_path"],
        quantize_mode=request["mode"],
        calibration_data={
            "input_ids": data["input_ids"],
            "attention_mask": data["attention_mask"],
        },
        calibration_method=request["method"],
        # Calibration runs on ONNX Runtime's CPU provider: no GPU is needed to quantise.
        calibration_eps=["cpu"],
        nodes_to_exclude=request["nodes_to_exclude"] or None,
        op_types_to_quantize=request.get("op_types") or None,
        use_external_data_format=True,
        output_path=request["output_path"],
        # The fp16 default casts the rest of the graph to fp16, which ONNX Runtime CPU runs
        # badly (cosine 0.80-0.88 against fp32 in the feasibility probe); keep fp32.
        high_precision_dtype=request.get("high_precision_dtype", "fp32"),
        log_level="ERROR",
    )
    print(
        json.dumps(
            {
                "seconds": round(time.perf_counter() - started, 2),
                "modelopt": __import__("modelopt").__version__,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
