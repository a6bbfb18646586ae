"""dllm-export: masked-diffusion language models to ONNX and TensorRT, and a thin runtime.

Importing the package is light: families, the exporter and torch load only when asked for.
"""

from dllm_export.errors import DllmExportError

__version__ = "0.1.0"
__all__ = ["DllmExportError", "__version__"]
