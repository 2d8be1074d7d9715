"""GENIE-D: data distillation from BN statistics (generator, swing convolution, BNS loss)."""

from .genie_d import MODES, distill

__all__ = ["MODES", "distill"]
