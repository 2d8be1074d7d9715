"""onnxgenie: data-free post-training quantization (GENIE) of ONNX image classifiers, on a CPU."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("onnxgenie")
except PackageNotFoundError:  # run from a source tree that was not installed
    __version__ = "0+unknown"

from .api import quantize
from .distill import distill
from .export import export_qdq
from .config import PRESETS, QuantizeConfig, preset_config
from .pipeline import QuantizationResult
from .quant.reconstruct import reconstruct

__all__ = ["__version__", "PRESETS", "QuantizationResult", "QuantizeConfig", "distill", "export_qdq", "preset_config", "quantize",
           "reconstruct"]
