"""What is quantized and how: the one source of truth shared by init, simulation, reconstruction, export.

A ``QuantPlan`` lives as plain NumPy arrays between stages and is saved as ``.npz`` + JSON.
Integer weights ``wint`` already include the zero point: W_q = scale * (wint - zero_point).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


def int_range(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    if signed:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return (lo + 1 if narrow else lo), hi
    return 0, 2 ** bits - 1


@dataclass
class WeightQuant:
    """Per-output-channel quantizer of one Conv/Gemm/MatMul weight initializer."""

    node: str
    weight: str
    bits: int
    symmetric: bool = True
    axis: int = 0                     # output-channel axis of the weight tensor
    narrow: bool = False              # [-127, 127] style range (TensorRT)
    scale: np.ndarray | None = None   # float32 [C]
    zero_point: np.ndarray | None = None  # int32 [C]
    wint: np.ndarray | None = None    # int32, weight's shape, in [qmin, qmax]

    @property
    def signed(self) -> bool:
        return self.symmetric

    @property
    def qrange(self) -> tuple[int, int]:
        return int_range(self.bits, self.signed, self.narrow)

    def bshape(self, ndim: int) -> tuple[int, ...]:
        shape = [1] * ndim
        shape[self.axis] = -1
        return tuple(shape)

    def dequantized(self) -> np.ndarray:
        nd = self.wint.ndim
        s = self.scale.astype(np.float32).reshape(self.bshape(nd))
        z = self.zero_point.astype(np.int32).reshape(self.bshape(nd))
        return ((self.wint - z).astype(np.float32) * s).astype(np.float32)


@dataclass
class ActQuant:
    """Per-tensor quantizer of one activation tensor (shared by all its quantized consumers).

    Stored codes q lie in ``int_range(bits, signed)`` and stand for scale * (q - zero_point). The zero
    point is 0 except on an unsigned grid over a tensor with a small negative part (SiLU, HardSwish,
    LeakyReLU outputs), where it puts the tensor's minimum on the grid.
    """

    tensor: str
    bits: int
    signed: bool
    consumers: list[str] = field(default_factory=list)
    scale: float | None = None
    zero_point: int = 0

    @property
    def qrange(self) -> tuple[int, int]:
        """The integer range of round(x / scale), i.e. of q - zero_point: what the float simulation clips to."""
        qmin, qmax = int_range(self.bits, self.signed)
        return qmin - self.zero_point, qmax - self.zero_point


TARGETS = ("ort", "tensorrt")


@dataclass
class QuantPlan:
    weights: dict[str, WeightQuant] = field(default_factory=dict)   # by node name
    acts: dict[str, ActQuant] = field(default_factory=dict)         # by tensor name
    target: str = "ort"        # "tensorrt": symmetric int8 storage, biases as int32 (s_x * s_w)

    def to_arrays(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-able metadata, arrays) for saving with ``np.savez``."""
        meta: dict = {"weights": {}, "acts": {}, "target": self.target}
        arrays: dict[str, np.ndarray] = {}
        for i, (name, w) in enumerate(self.weights.items()):
            d = {k: v for k, v in asdict(w).items() if k not in ("scale", "zero_point", "wint")}
            meta["weights"][name] = {**d, "key": f"w{i}"}
            for k in ("scale", "zero_point", "wint"):
                if getattr(w, k) is not None:
                    arrays[f"w{i}_{k}"] = getattr(w, k)
        for name, a in self.acts.items():
            meta["acts"][name] = asdict(a)
        return meta, arrays

    @classmethod
    def from_arrays(cls, meta: dict, arrays) -> "QuantPlan":
        plan = cls(target=meta.get("target", "ort"))
        for name, d in meta["weights"].items():
            d = dict(d)
            key = d.pop("key")
            w = WeightQuant(**d)
            for k in ("scale", "zero_point", "wint"):
                if f"{key}_{k}" in arrays:
                    setattr(w, k, np.asarray(arrays[f"{key}_{k}"]))
            plan.weights[name] = w
        for name, d in meta["acts"].items():
            plan.acts[name] = ActQuant(**d)
        return plan
