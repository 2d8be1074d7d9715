"""onnxgenie: data-free post-training quantization (GENIE) of ONNX image classifiers, on a CPU."""

from .api import quantize
from .distill import distill
from .export import export_qdq
from .pipeline import PRESETS, QuantizationResult, QuantizeConfig, preset_config
from .quant.reconstruct import reconstruct

__all__ = ["PRESETS", "QuantizationResult", "QuantizeConfig", "distill", "export_qdq", "preset_config", "quantize",
           "reconstruct"]
