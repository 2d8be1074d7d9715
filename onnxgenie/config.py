"""Every setting of ``onnxgenie quantize``, declared once.

Each ``QuantizeConfig`` field is declared with ``setting(...)``: its default (``QuantizeConfig()`` is
init-only), its help text, its command-line flag, the ``Check`` that refuses a bad value, and, where the
run may choose the value, the ``Rule`` that chooses it. The command line (``cli.build_parser``), README's
reference table (``tools/cli_reference.py``) and ``check_config`` all read this one declaration.

``PRESETS`` are budgets on top of the defaults. A preset value may be a setting's ``Rule.auto`` (None,
or the word "auto"): ``settle`` then asks the rule, which may read the settings and the model
(``ModelFacts``), once the model is loaded. A new rule is one ``rule=Rule(...)`` in a declaration.
"""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, dataclass, field, fields, replace
from functools import cached_property
from typing import Any, Callable

import numpy as np
import onnx

from .distill.genie_d import MODES
from .errors import BadInputError, BadSettingError
from .graph.load import image_io
from .quant.augment import AUGMENTS, resolve
from .quant.plan import WEIGHT_GRIDS, check_bits, check_weight_grid
from .quant.reconstruct import QUANTIZERS
from .quant.spec import TARGETS
from .resources import cap_to_cores, default_jobs, default_threads, multiply_adds

CALIB_SOURCES = ("distill", "data", "noise")
SEED_LIMIT = 2 ** 63


def _is_whole(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


# ------------------------------------------------------------------------------------------------
# Checks: each refuses a bad value in one line naming the flag (BadSettingError).

@dataclass(frozen=True)
class Whole:
    """A whole number >= ``low`` (None: the bit-width check says) and below ``below``."""
    low: int | None = None
    optional: bool = False
    below: int | None = None

    def __call__(self, s: Setting, v) -> None:
        if v is None and self.optional:
            return
        if v is None or not _is_whole(v) or (self.low is not None and v < self.low) \
                or (self.below is not None and v >= self.below):
            rule = "a whole number" + ("" if self.low is None else f" >= {self.low}")
            raise BadSettingError(f"{s.flag_name} must be {rule} (got {v!r}); pass one, or leave it out for the "
                                  "preset's value")


@dataclass(frozen=True)
class Real:
    """A finite number in [``low``, ``high``] (``low`` itself excluded where ``open_low``)."""
    low: float = 0.0
    high: float = math.inf
    open_low: bool = False
    optional: bool = False

    def __call__(self, s: Setting, v) -> None:
        if v is None and self.optional:
            return
        if not _is_real(v) or not math.isfinite(v) or v < self.low or (self.open_low and v == self.low) \
                or v > self.high:
            bound = f"> {self.low:g}" if self.open_low else f">= {self.low:g}"
            rule = bound + (f" and <= {self.high:g}" if math.isfinite(self.high) else "")
            raise BadSettingError(f"{s.flag_name} must be a finite number {rule} (got {v!r}); pass one, or leave "
                                  "it out for the default")


@dataclass(frozen=True)
class Switch:
    """True or False."""

    def __call__(self, s: Setting, v) -> None:
        if not isinstance(v, (bool, np.bool_)):
            raise BadSettingError(f"{s.name} must be True or False (got {v!r}); pass a bool")


@dataclass(frozen=True)
class OneOf:
    """One of a few words."""
    choices: tuple[str, ...]

    def __call__(self, s: Setting, v) -> None:
        if v not in self.choices:
            raise BadSettingError(f"{s.flag_name} {v!r} is not one of {', '.join(self.choices)}; pass one of those")


@dataclass(frozen=True)
class Names:
    """A list of names (node names, op types)."""
    what: str = "node names"
    optional: bool = False

    def __call__(self, s: Setting, v) -> None:
        if v is None and self.optional:
            return
        if isinstance(v, str) or not isinstance(v, (tuple, list)) or not all(isinstance(n, str) for n in v):
            raise BadSettingError(f"{s.flag_name} must be a list of {self.what} (got {v!r}); names are in "
                                  "`onnxgenie inspect --plan`")


@dataclass(frozen=True)
class Folder:
    """A folder path, or None."""

    def __call__(self, s: Setting, v) -> None:
        if v is not None and not isinstance(v, (str, os.PathLike)):
            raise BadSettingError(f"{s.flag_name} must be a folder path (got {v!r}); pass a str or a Path")


@dataclass(frozen=True)
class Size:
    """Two positive whole numbers H W, or None."""

    def __call__(self, s: Setting, v) -> None:
        if v is not None and (not isinstance(v, (tuple, list)) or len(v) != 2
                              or not all(_is_whole(n) and n > 0 for n in v)):
            raise BadSettingError(f"{s.flag_name} needs two positive whole numbers H W (got {v!r}); pass the height "
                                  "and width the model was trained at")


@dataclass(frozen=True)
class Numbers:
    """A list of numbers per channel, or None (checked with its partner by ``check_preprocessing``)."""

    def __call__(self, s: Setting, v) -> None:
        pass


@dataclass(frozen=True)
class Free:
    """Not checked (a record of where the values came from)."""

    def __call__(self, s: Setting, v) -> None:
        pass


Check = Whole | Real | Switch | OneOf | Names | Folder | Size | Numbers | Free


# ------------------------------------------------------------------------------------------------
# Rules: a value the run chooses from the settings and the model.

class ModelFacts:
    """What a rule may read of the model (its normal form): the input's (C, H, W) and the multiply-adds of
    one image (computed on first use)."""

    def __init__(self, normal: onnx.ModelProto):
        self.normal = normal

    @cached_property
    def chw(self) -> tuple[int, int, int]:
        return tuple(image_io(self.normal).chw)

    @cached_property
    def multiply_adds(self) -> int:
        return multiply_adds(self.normal)


@dataclass(frozen=True)
class Rule:
    """The value of a setting left at ``auto``: ``choose(config, model)``, the model's ``ModelFacts``.
    ``says`` is the rule in words, for --help; a rule that ``reads_model`` is shown only in words in
    README's presets table (the others by their values at a few bit widths)."""
    choose: Callable[[Any, ModelFacts], Any]
    says: str
    auto: Any = None
    reads_model: bool = False


# 4-bit activation steps at 64x the rate in the fast preset's 500 steps (beside 4-bit weights or more):
# ShuffleNet W4A4 74.84 -> 78.54 (cached images, three seeds; x4 76.51, x16 77.79); ResNet-20/32 level at
# x4, x16 and x64. At 2-bit weights x64 cost ShuffleNet W2A4 3.9 pt (two seeds), so it stays 1 (docs/design.md).
FAST_ACT_LR_SCALE = 64.0

# Two reconstructions below 4-bit weights, the one with the lower calibration KL kept: ResNet-20 W2A4, eight
# paired seeds on one image set, 76.72 against 76.52 (level), s.d. 0.38 against 1.62: the run about one in 16
# that falls ~4 pt is replaced; among normal runs the KL picks no better than chance (held-out seeds). W4A4's
# spread (s.d. ~0.25) leaves nothing to insure (docs/design.md).
FAST_CANDIDATES_BELOW_4_BIT = 2

ACT_LR_SCALE_RULE = Rule(lambda c, m: FAST_ACT_LR_SCALE if c.wbits >= 4 and c.abits <= 4 else 1.0,
                         f"{FAST_ACT_LR_SCALE:g} for 4-bit activations beside weights of 4 bits or more, else 1")
CANDIDATES_RULE = Rule(lambda c, m: FAST_CANDIDATES_BELOW_4_BIT if c.wbits < 4 else 1,
                       f"{FAST_CANDIDATES_BELOW_4_BIT} below 4-bit weights, else 1")
AUGMENT_RULE = Rule(lambda c, m: resolve("auto", c.wbits), "flip-shift below 4-bit weights, else none", auto="auto")

# The fast preset's budget by the model's cost. Small: ResNet-20 at 32x32 (0.041 G multiply-adds per image) on
# 2 cores in minutes. Large (ImageNet-class, above LARGE_MODEL_MACS): EfficientNet-Lite0 at 224x224 (0.39 G),
# where the small budget would take hours: 64 images distilled in batches of 16 for 100 steps, 100 GENIE-M steps
# in batches of 16; 250 real images and 2.5x the steps gained 8 pt at W4A4, 64 distilled images at 8 bits are
# level with FP32 without GENIE-M (docs/design.md).
LARGE_MODEL_MACS = 200_000_000
FAST_BUDGET = {"small": dict(calib_images=256, distill_iters=200, distill_batch=128, recon_iters=500, recon_batch=32),
               "large": dict(calib_images=64, distill_iters=100, distill_batch=16, recon_iters=100, recon_batch=16)}


def is_large(model: ModelFacts) -> bool:
    return model.multiply_adds > LARGE_MODEL_MACS


def _budget_rule(name: str) -> Rule:
    small, large = FAST_BUDGET["small"][name], FAST_BUDGET["large"][name]
    return Rule(lambda c, m: large if is_large(m) else small,
                f"{small}, {large} above {LARGE_MODEL_MACS / 1e9:g} G multiply-adds per image", reads_model=True)


# 8-bit weights and activations of a large model: the steps from the images alone are level with FP32
# (Lite0: 88.40 against 88.40 %), GENIE-M's steps would add ten minutes for nothing.
RECONSTRUCT_RULE = Rule(lambda c, m: not (is_large(m) and c.wbits >= 8 and c.abits >= 8),
                        "on, off at 8-bit weights and activations above "
                        f"{LARGE_MODEL_MACS / 1e9:g} G multiply-adds per image", reads_model=True)


# ------------------------------------------------------------------------------------------------
# The declaration.

@dataclass(frozen=True)
class Setting:
    """One option: what it means, its flag, its check, and the rule that may choose it."""
    help: str
    check: Check
    flag: str | None = ""          # "" : --the-name; None: not on the command line
    short: str | None = None       # a one-letter alias, e.g. -q
    metavar: str | tuple[str, ...] | None = None
    cli_choices: tuple[str, ...] | None = None   # the words the flag takes, where fewer than the check's
    rule: Rule | None = None
    name: str = ""                 # filled in from the field

    @property
    def flag_name(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def check_value(self, value) -> None:
        if self.rule is not None and value == self.rule.auto:
            return   # settle() asks the rule, and checks its answer
        self.check(self, value)


def setting(default, help: str, check: Check, **declared) -> Any:
    """A QuantizeConfig field with its declaration (``Setting``) in the field's metadata."""
    return field(default=default, metadata={"setting": Setting(help, check, **declared)})


@dataclass(frozen=True)
class QuantizeConfig:
    """Every setting of a run. ``QuantizeConfig()`` is init-only; ``preset_config`` gives the presets."""

    # what is quantized, and how
    wbits: int = setting(4, "weight bits, 2-8", Whole())
    abits: int = setting(4, "activation bits, 4-8", Whole())
    first_last_bits: int = setting(
        8, "bits of the first/last layer's weights and of the 2nd/last layer's input", Whole())
    target: str = setting("ort", "ort: asymmetric per-channel weights; tensorrt: int8, zero points 0, int32 biases",
                          OneOf(TARGETS))
    weight_grid: str = setting(
        "auto", "per-channel weight grid: asym (the paper's), sym (zero point 0), auto (default): sym for depthwise "
        "convs, asym for the rest", OneOf(WEIGHT_GRIDS))
    exclude: tuple[str, ...] = setting(
        (), "nodes kept in float (onnxruntime's nodes_to_exclude); names from `onnxgenie inspect --plan`, space- or "
        "comma-separated", Names(), metavar="NODE")
    op_types: tuple[str, ...] | None = setting(
        None, "quantize only nodes of these op types, e.g. Conv (onnxruntime's op_types_to_quantize; default: Conv, "
        "Gemm, MatMul and the residual Adds the plan needs)", Names("op types (Conv, Gemm, ...)", optional=True),
        metavar="OP")
    high_bits: tuple[str, ...] = setting(
        (), "nodes quantized like the first and last layer: weights and input at --first-last-bits (mixed precision "
        "for sensitive layers; names from `onnxgenie inspect --plan`)", Names(), metavar="NODE")
    auto_high_bits: int = setting(
        0, "K more layers like --high-bits, chosen without data: those whose high bits bring the quantized model "
        "closest to FP32 on the calibration images (KL of the outputs)", Whole(0), metavar="K")
    act_batch: int = setting(64, "images per batch of the activation-range pass", Whole(1), flag=None)
    # GENIE-M reconstruction
    reconstruct: bool | None = setting(False, "step initialisation only (no GENIE-M)", Switch(), flag="--no-reconstruct",
                                       rule=RECONSTRUCT_RULE)
    quantizer: str = setting("genie", "reconstruction weight quantizer: genie learns the weight steps, adaround "
                             "keeps them", OneOf(QUANTIZERS))
    recon_iters: int = setting(2000, "reconstruction steps per block", Whole(1), rule=_budget_rule("recon_iters"))
    recon_batch: int = setting(32, "reconstruction batch size", Whole(1), rule=_budget_rule("recon_batch"))
    recon_lr_scale: float = setting(1.0, "factor on GENIE-M's learning rates; short budgets want larger ones",
                                    Real(open_low=True))
    recon_act_lr_scale: float | None = setting(
        1.0, "a further factor on the activation steps' learning rate", Real(open_low=True), rule=ACT_LR_SCALE_RULE)
    recon_candidates: int | None = setting(
        1, "reconstruct N times with different seeds (in parallel, one process per core) and keep the one whose "
        "outputs on the calibration images are closest to FP32 (KL)", Whole(1), metavar="N", rule=CANDIDATES_RULE)
    recon_qdrop: bool = setting(
        True, "QDrop at the activation quantizers inside each block: each element quantized with probability 0.5 "
        "(on) or always (off); the block's input is a float/quantized mix either way", Switch(), flag="--qdrop")
    recon_augment: str = setting(
        "none", "reconstruct on the calibration images plus mirrored (flip) and shifted copies", OneOf(AUGMENTS),
        rule=AUGMENT_RULE)
    lam: float | None = setting(None, "rounding-loss weight (default 1.0 genie, 0.1 adaround)",
                                Real(optional=True), flag="--lambda")
    # calibration images
    calib: str = setting("distill", "calibration images without --calib-data: GENIE-D (default) or Gaussian noise",
                         OneOf(CALIB_SOURCES), cli_choices=("distill", "noise"))
    input_size: tuple[int, int] | None = setting(None, "fix a dynamic (or invalid) input height and width", Size(),
                                                 metavar=("H", "W"))
    calib_images: int = setting(256, "number of calibration images", Whole(1), rule=_budget_rule("calib_images"))
    distill_iters: int = setting(500, "GENIE-D steps per batch", Whole(1), rule=_budget_rule("distill_iters"))
    distill_batch: int = setting(128, "images distilled together", Whole(1), rule=_budget_rule("distill_batch"))
    distill_mode: str = setting(
        "genie", "GENIE-D ablation: generator + latents (genie, default), pixels (zeroq), fixed latents (noise)",
        OneOf(MODES))
    swing: bool = setting(True, "GENIE-D without swing convolution (ablation)", Switch(), flag="--no-swing")
    mean: tuple[float, ...] | None = setting(
        None, "the model's per-channel input mean (after /255): preprocesses uint8 --calib-data and, where the image "
        "is quantized (W8A8, tensorrt), gives its exact range", Numbers())
    std: tuple[float, ...] | None = setting(None, "the model's per-channel input std (after /255), as --mean",
                                            Numbers())
    # the run
    jobs: int = setting(0, "distillation processes (default: cores, bounded by memory)", Whole(0))
    threads: int = setting(0, "onnxruntime threads (default: one per core)", Whole(0))
    workdir: str | None = setting(None, "keep finished distillation batches / reconstructed blocks here", Folder())
    seed: int = setting(0, "the seed of every random choice", Whole(0, below=SEED_LIMIT))
    holdout_images: int = setting(
        0, "extra distilled images that only measure FP32-vs-quantized agreement", Whole(0))
    min_agreement: float | None = setting(
        None, "quality gate: exit 3 and write no model when top-1 agreement with FP32 is below P %%; use it with "
        "--holdout-images N: without them agreement is measured on the calibration images the model was fitted to, "
        "which is optimistic", Real(0.0, 100.0, optional=True), metavar="P")
    progress: bool = setting(True, "no progress bars or notes: only errors on stderr", Switch(), flag="--quiet",
                             short="-q")
    verbose: bool = setting(False, "a line per distillation batch and per block", Switch(), short="-v")
    preset: str | None = setting(None, "the preset the values came from (for the report)", Free(), flag=None)


SETTINGS: dict[str, Setting] = {}
for _f in fields(QuantizeConfig):
    object.__setattr__(_f.metadata["setting"], "name", _f.name)
    SETTINGS[_f.name] = _f.metadata["setting"]


def default(name: str):
    """A setting's default (``QuantizeConfig()``'s value)."""
    f = QuantizeConfig.__dataclass_fields__[name]
    return f.default if f.default is not MISSING else f.default_factory()


# fast: a budget by the model's cost (FAST_BUDGET; ResNet-20 on 2 cores in minutes: two distillation batches
# of 128, one round on two cores), GENIE-M's learning rates x8 (docs/design.md). No held-out images: 64 more would cost a second
# distillation round there, and batches of 160 (to fit them in one) cost 1.9 pt at W2A4. paper: GENIE's own.
# A value equal to the setting's Rule.auto is chosen by that rule (``settle``).
PRESETS: dict[str, dict] = {
    "fast": dict(calib_images=None, holdout_images=0, distill_iters=None, distill_batch=None, reconstruct=None,
                 recon_iters=None, recon_batch=None, recon_lr_scale=8.0, recon_augment="auto", recon_act_lr_scale=None,
                 recon_candidates=None),
    "paper": dict(calib_images=1024, holdout_images=128, distill_iters=4000, distill_batch=128, reconstruct=True,
                  recon_iters=20000, recon_batch=32, recon_lr_scale=1.0),
}


def preset_config(preset: str = "fast", **overrides) -> QuantizeConfig:
    """The preset's budget with ``overrides`` (any QuantizeConfig field) on top; None values are ignored."""
    if preset not in PRESETS:
        raise BadInputError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - set(SETTINGS))
    if unknown:
        raise BadSettingError(f"unknown settings {unknown}; use QuantizeConfig's fields: {', '.join(sorted(SETTINGS))}")
    config = QuantizeConfig(**{**PRESETS[preset], "preset": preset,
                               **{k: v for k, v in overrides.items() if v is not None}})
    check_config(config)
    return config


def check_config(config: QuantizeConfig) -> None:
    """Refuse, before any work, a setting of the wrong type or out of range (each setting's ``Check``),
    bit widths the target cannot run, and --mean/--std that do not go together (one line naming the flag)."""
    for name, s in SETTINGS.items():
        s.check_value(getattr(config, name))
    check_bits(config.wbits, config.abits, config.first_last_bits, config.target)
    check_weight_grid(config.weight_grid, config.target)
    check_preprocessing(config.mean, config.std)


def check_preprocessing(mean, std) -> None:
    """--mean and --std come together, one finite value per channel each (the count is checked on use),
    std > 0."""
    if (mean is None) != (std is None):
        raise BadInputError("--mean and --std go together; give both (per channel, after /255) or neither")
    if mean is None:
        return
    if not all(isinstance(v, (tuple, list, np.ndarray)) for v in (mean, std)) \
            or not all(_is_real(v) for v in (*mean, *std)):
        raise BadSettingError(f"--mean/--std must be lists of numbers (got {mean!r} / {std!r}); give one per "
                              "channel, after /255")
    if len(std) != len(mean) or not all(math.isfinite(v) for v in (*mean, *std)) or any(not v > 0 for v in std):
        raise BadSettingError(f"--mean/--std need the same number of finite values, std > 0 (got {list(mean)} / "
                              f"{list(std)}); give the model's per-channel normalisation, after /255")


def settle(config: QuantizeConfig, model: ModelFacts | None = None) -> QuantizeConfig:
    """``config`` with every setting left at its rule's ``auto`` chosen by the rule, then checked. Only
    rules that do not read the model are settled without one (``model`` None); the others wait for it."""
    chosen = {name: s.rule.choose(config, model) for name, s in SETTINGS.items()
              if s.rule is not None and getattr(config, name) == s.rule.auto and (model or not s.rule.reads_model)}
    if not chosen:
        return config
    settled = replace(config, **chosen)
    for name in chosen:
        SETTINGS[name].check(SETTINGS[name], chosen[name])
    return settled


def fit_to_machine(config: QuantizeConfig, distilling: bool) -> QuantizeConfig:
    """Threads and distillation processes for this machine: --threads 0 is one per core, --jobs 0 one
    per core and batch when distilling (else 1); more than the cores are lowered to them, in a note."""
    threads = default_threads(config.threads, notify=config.progress)
    jobs = config.jobs
    if distilling:
        batches = -(-(config.calib_images + config.holdout_images) // config.distill_batch)
        jobs = cap_to_cores(jobs, "--jobs", notify=config.progress) if jobs else default_jobs(batches)
    return replace(config, threads=threads, jobs=jobs or 1)
