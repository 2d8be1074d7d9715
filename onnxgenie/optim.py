"""Adam in NumPy, one learning rate per parameter group (onnxruntime's optimizer model has one rate)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ParamGroup:
    names: list[str]
    lr: float


@dataclass
class Adam:
    """PyTorch-equivalent Adam (no weight decay) over NumPy arrays, one learning rate per group."""

    groups: list[ParamGroup]
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    t: int = 0
    m: dict = field(default_factory=dict)
    v: dict = field(default_factory=dict)

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        out = {}
        for group in self.groups:
            for name in group.names:
                g = grads[name]
                m = self.m[name] = b1 * self.m.get(name, 0.0) + (1 - b1) * g
                v = self.v[name] = b2 * self.v.get(name, 0.0) + (1 - b2) * g * g
                out[name] = params[name] - group.lr * (m / c1) / (np.sqrt(v / c2) + self.eps)
        return out

    def state_dict(self) -> dict:
        return {"t": self.t, "m": dict(self.m), "v": dict(self.v), "lrs": [g.lr for g in self.groups]}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.m, self.v = state["t"], dict(state["m"]), dict(state["v"])
        for group, lr in zip(self.groups, state["lrs"]):
            group.lr = lr
