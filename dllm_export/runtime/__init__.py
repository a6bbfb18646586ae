"""The thin runtime: unmasking algorithms over numpy, backends, and the app API.

Nothing here imports torch; the PyTorch backend imports it lazily when it is chosen.
"""

from dllm_export.runtime.api import GenerationOutput, Generator, sampler_defaults
from dllm_export.runtime.generate import SamplerConfig, Special, StepInfo, denoise
from dllm_export.runtime.prediction import Prediction, summarize_logits

__all__ = [
    "GenerationOutput",
    "Generator",
    "Prediction",
    "SamplerConfig",
    "Special",
    "StepInfo",
    "denoise",
    "sampler_defaults",
    "summarize_logits",
]
