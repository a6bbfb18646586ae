"""Calibration data, quantisation backends and the quality gate (``dllm-export quantize``).

| module               | job                                                            |
|----------------------|----------------------------------------------------------------|
| ``sources``          | calibration texts: a text file, JSONL, the built-in sets       |
| ``states``           | denoiser inputs: forward-process and trajectory canvases       |
| ``coverage``         | mask-ratio histogram, tokens per expert from the routers       |
| ``collect``          | states + coverage for one artifact                             |
| ``recipes``          | which linear layers are quantised (routers and head are not)   |
| ``methods``          | the methods per precision, as data                             |
| ``ort_backend``      | ONNX Runtime: INT8 static Q/DQ, MatMulNBits INT4/INT8          |
| ``modelopt_backend`` | ModelOpt in its own environment (``modelopt_worker`` runs there) |
| ``evalgraph``        | the candidate graph for the gate, FP8 fake-quantisation        |
| ``gate``             | the quality gate over ``dllm_export.eval.harness``             |
| ``quantize``         | ``quantize_artifact``: the verb                                |

See docs/quantization.md for the measurements behind the defaults.
"""
