"""Export stages: torch -> ONNX (onnx.py), validation, the TensorRT lint, planning, builds."""
