"""Deployable exports of a quantization plan."""

from .qdq import export_qdq

__all__ = ["export_qdq"]
