"""What became of a block (or of a layer learned alone): learned, kept at round-to-nearest and why, or
resumed from a saved block. ``str()`` is the text of the report; ``BlockStatus.parse`` reads it back."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class Outcome(Enum):
    LEARNED = "ok"
    ROUND_TO_NEAREST = "rtn"
    RESUMED = "resumed"


class Why(Enum):
    """Why a block kept its round-to-nearest start."""

    GRAPH_FAILED = "training graph failed"          # an op without a gradient, an unexpected graph
    STEP_FAILED = "training step failed"            # a gradient kernel failing at run time
    DIVERGED = "loss diverged twice"                # NaN/Inf, again at halved learning rates
    RAISED_ERROR = "learning raised the block's error"


RETRIED = "retried with halved learning rates"
_LAYERS = re.compile(r"^(ok|rtn) \(layer by layer, (\d+) of (\d+) layers learned; block (.*)\)$")


@dataclass(frozen=True)
class BlockStatus:
    outcome: Outcome
    why: Why | None = None                 # ROUND_TO_NEAREST: the reason
    detail: str = ""                       # GRAPH_FAILED / STEP_FAILED: the engine's error
    retried: bool = False                  # LEARNED after a restart at halved learning rates
    layers: tuple[int, int] | None = None  # learned layer by layer: (layers learned, layers)
    block: BlockStatus | None = None       # learned layer by layer: what the whole block's training gave

    @classmethod
    def ok(cls, retried: bool = False) -> BlockStatus:
        return cls(Outcome.LEARNED, retried=retried)

    @classmethod
    def kept(cls, why: Why, detail: str = "") -> BlockStatus:
        return cls(Outcome.ROUND_TO_NEAREST, why, detail)

    @classmethod
    def by_layer(cls, learned: int, layers: int, block: BlockStatus) -> BlockStatus:
        outcome = Outcome.LEARNED if learned else Outcome.ROUND_TO_NEAREST
        return cls(outcome, layers=(learned, layers), block=block)

    @property
    def learned(self) -> bool:
        return self.outcome is Outcome.LEARNED

    @property
    def training_failed(self) -> bool:
        """The training graph could not be built or run (the block may still be learned layer by layer)."""
        return self.why in (Why.GRAPH_FAILED, Why.STEP_FAILED)

    @property
    def reason(self) -> str | None:
        """Why the block as a whole kept round-to-nearest (None when it did not, or went layer by layer)."""
        if self.outcome is not Outcome.ROUND_TO_NEAREST or self.layers is not None:
            return None
        return f"{self.why.value}: {self.detail}" if self.detail else self.why.value

    def __str__(self) -> str:
        if self.layers is not None:
            return (f"{self.outcome.value} (layer by layer, {self.layers[0]} of {self.layers[1]} layers learned; "
                    f"block {self.block})")
        if self.outcome is Outcome.ROUND_TO_NEAREST:
            return f"rtn ({self.reason})"
        return f"ok ({RETRIED})" if self.retried else self.outcome.value

    @classmethod
    def parse(cls, text: str) -> BlockStatus:
        """The status whose ``str()`` is ``text``."""
        found = _LAYERS.match(text)
        if found:
            return cls.by_layer(int(found[2]), int(found[3]), cls.parse(found[4]))
        if text in ("ok", "resumed"):
            return cls(Outcome(text))
        if text == f"ok ({RETRIED})":
            return cls.ok(retried=True)
        inner = text[len("rtn ("):-1] if text.startswith("rtn (") and text.endswith(")") else None
        for why in Why:
            if inner == why.value or (inner or "").startswith(why.value + ": "):
                return cls.kept(why, inner[len(why.value) + 2:])
        raise ValueError(f"not a block status: {text!r}")


RESUMED = BlockStatus(Outcome.RESUMED)


def as_text(stats: dict) -> dict:
    """``stats`` with every status (its own and each layer's) as its text: what the report and the saved
    blocks hold."""
    out = {k: str(v) if isinstance(v, BlockStatus) else v for k, v in stats.items()}
    if "per_layer" in out:
        out["per_layer"] = [as_text(layer) for layer in out["per_layer"]]
    return out
