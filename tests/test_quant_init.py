"""Step-size initialisation: the vectorised L2.4 search against a brute-force loop, and the weights
and activations it fills in."""

from __future__ import annotations

import numpy as np
import pytest

import fixtures
from onnxgenie.graph.bn import fold_bn, initializers
from onnxgenie.graph.load import normalize
from onnxgenie.quant.init import (CLIP_RATIOS, IMAGE_SIGMAS, act_fake_quant, image_range, init_activations,
                                  init_weights, lp_search, set_image_step)
from onnxgenie.quant.plan import build_plan
from onnxgenie.quant.spec import ActQuant, int_range
from onnxgenie.runtime import batches


def brute_force(row: np.ndarray, qmin: int, qmax: int, symmetric: bool, p: float = 2.4):
    """One channel, one ratio at a time, with scalar Python arithmetic (float64 except the grid)."""
    lo, hi = min(float(row.min()), 0.0), max(float(row.max()), 0.0)
    best, best_s, best_z = np.inf, 1.0, 0
    for r in CLIP_RATIOS:
        if symmetric:
            top = np.float32(max(abs(lo), abs(hi))) * r
            bottom = -top if qmin < 0 else np.float32(0)
            s = np.float32((top - bottom) / np.float32(qmax - qmin))
            z = 0.0
        else:
            top, bottom = np.float32(hi) * r, np.float32(lo) * r
            s = np.float32((top - bottom) / np.float32(qmax - qmin))
            z = float(np.clip(np.round(qmin - bottom / s), qmin, qmax)) if s > 0 else 0.0
        if not s > 0:
            s = np.float32(1.0)
        err = 0.0
        for v in row:
            q = min(max(np.round(np.float32(v) / s) + z, qmin), qmax)
            err += abs(float(v) - float(np.float32((q - z) * s))) ** p
        err /= len(row)
        if err < best * (1 - 1e-6):  # the vectorised search sums in float32 powers: allow rounding noise
            best, best_s, best_z = err, float(s), int(z)
    return best_s, best_z


@pytest.mark.parametrize("symmetric,signed,narrow", [(True, True, False), (True, True, True),
                                                      (True, False, False), (False, False, False)])
@pytest.mark.parametrize("bits", [4, 8])
def test_lp_search_matches_brute_force(symmetric, signed, narrow, bits):
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((6, 40)).astype(np.float32) * rng.uniform(0.1, 3, (6, 1)).astype(np.float32)
    x[1] += 1.5                     # a channel that is all positive (asymmetric zero point at the bottom)
    x[2, :5] = 9.0                  # outliers: clipping pays off
    if not signed:
        x = np.abs(x)
    qmin, qmax = int_range(bits, signed, narrow)
    scale, zero = lp_search(x, qmin, qmax, symmetric)
    for c in range(x.shape[0]):
        s, z = brute_force(x[c], qmin, qmax, symmetric)
        assert scale[c] == pytest.approx(s, rel=1e-6), c
        assert zero[c] == z
    assert scale.dtype == np.float32 and zero.dtype == np.int32


def test_outliers_are_clipped_and_zero_rows_are_exact():
    x = np.zeros((2, 4000), np.float32)
    x[0] = np.random.default_rng(0).laplace(size=4000)  # heavy tails: at 4 bits clipping them pays off
    scale, zero = lp_search(x, -8, 7, True)
    full_range = np.abs(x[0]).max() / 7.5
    assert scale[0] < 0.9 * full_range
    assert scale[1] == 1.0 and zero[1] == 0  # all-zero channel: any step represents it exactly


def test_init_weights_fills_grid_and_rounds_to_nearest():
    folded = fold_bn(normalize(fixtures.conv_bn_net()))
    plan = init_weights(folded, build_plan(folded, 4, 8))
    inits = initializers(folded)
    for wq in plan.weights.values():
        w = inits[wq.weight]
        qmin, qmax = wq.qrange
        assert wq.wint.shape == w.shape and wq.wint.min() >= qmin and wq.wint.max() <= qmax
        assert wq.scale.shape == (w.shape[wq.axis],) and np.all(wq.scale > 0)
        assert np.all((wq.zero_point >= qmin) & (wq.zero_point <= qmax))
        # round to nearest: inside the clipping range every weight is within half a step
        deq = wq.dequantized()
        s = wq.scale.reshape(wq.bshape(w.ndim))
        inside = (wq.wint > qmin) & (wq.wint < qmax)
        assert np.all(np.abs(deq - w)[inside] <= (0.5 * s * np.ones_like(w))[inside] * (1 + 1e-5))


@pytest.mark.parametrize("abits", [8, 4])
def test_init_activations_sign_and_range(abits):
    folded = fold_bn(normalize(fixtures.conv_bn_net()))
    plan = build_plan(folded, 4, abits)
    x = np.random.default_rng(0).standard_normal((20, 3, 8, 8)).astype(np.float32)
    init_activations(folded, plan, x, batch_size=7)
    values = {t: [] for t in plan.acts}
    for _, batch in batches(folded, x, list(plan.acts), batch_size=20):
        for t, v in zip(plan.acts, batch):
            values[t].append(v)
    for t, act in plan.acts.items():
        v = np.concatenate(values[t])
        assert act.signed == bool(v.min() < 0)
        qmin, qmax = act.qrange
        top = act.scale * (qmax - qmin) / (2 if act.signed else 1)  # the clipped range the step came from
        assert 0 < top <= np.abs(v).max() * (1 + 1e-6)
        assert act.zero_point == 0
        # few values: the search saw all of them (zeros left out), so it equals the search on the full tensor
        full, _ = lp_search(v.reshape(1, -1), qmin, qmax, True)
        if act.bits == 8:   # 8-bit activations keep their whole range: nothing is clipped
            assert top == pytest.approx(float(np.abs(v).max() if act.signed else v.max()), rel=1e-6)
            assert act.scale >= float(full[0])
        else:
            assert act.scale == pytest.approx(float(full[0]), rel=1e-6)
    assert {a.bits for a in plan.acts.values()} == ({8} if abits == 8 else {4, 8})


def test_image_range_exact_from_preprocessing_else_from_spread():
    lo, hi = image_range(np.zeros((1, 3, 2, 2), np.float32), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert (lo, hi) == pytest.approx((-0.485 / 0.229, (1 - 0.406) / 0.225))
    x = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32) * 2 + 1
    lo, hi = image_range(x)
    assert (lo, hi) == pytest.approx((x.mean() - IMAGE_SIGMAS * x.std(), x.mean() + IMAGE_SIGMAS * x.std()), rel=1e-5)


@pytest.mark.parametrize("lo, hi, signed", [(-2.12, 2.64, True), (0.0, 1.0, False), (-1.0, 0.5, True)])
def test_image_step_covers_its_range_without_clipping(lo, hi, signed):
    act = set_image_step(ActQuant("input", 8, signed=True), lo, hi)
    assert act.signed == signed and act.zero_point == 0
    x = np.linspace(lo, hi, 10001, dtype=np.float32)
    err = np.abs(act_fake_quant(x, act) - x)
    assert err.max() <= act.scale / 2 * (1 + 1e-5)          # nothing clipped: only rounding error
    assert act.scale <= max(abs(lo), abs(hi)) / (act.qrange[1] - 1)   # and the grid is not wider than needed


def test_image_step_replaces_an_asymmetric_grid_from_real_images():
    """On real calibration images init_activations may leave the image on an unsigned grid with a zero point
    near the middle; the image step from --mean/--std (W8A8) is symmetric, zero point 0, over the whole range."""
    act = set_image_step(ActQuant("input", 8, signed=False, scale=0.0078, zero_point=127), -0.992, 1.0)
    assert act.signed and act.zero_point == 0 and act.scale == pytest.approx(1.0 / 127)
    x = np.linspace(-0.992, 1.0, 1001, dtype=np.float32)
    assert np.abs(act_fake_quant(x, act) - x).max() <= act.scale / 2 * (1 + 1e-5)


def test_tensorrt_image_step_stays_signed():
    assert set_image_step(ActQuant("input", 8, signed=True), 0.0, 1.0, signed_only=True).signed


@pytest.mark.slow  # real models quantized twice
def test_w8a8_image_quantizer_does_not_clip_real_images_after_synthetic_calibration():
    """GENIE-D's images span about ±1.25σ (Tanh, then a BN without affine); real standardised CIFAR
    images reach 2.6σ. Fitted on such images, the image's 8-bit range clipped real ones (ResNet-32
    W8A8 lost 2 pt); from synthetic images the range now comes from their spread or the preprocessing."""
    from conftest import dev_images, model_info, shared_model_path, train_images
    from onnxgenie.pipeline import QuantizeConfig, quantize

    name = "resnet20_cifar10"
    real, _ = dev_images(name, 500)
    train, _ = train_images(name)
    squashed = np.tanh(train[::8])   # GENIE-D's last two layers: Tanh, then BN without affine
    squashed = (squashed - squashed.mean(axis=(0, 2, 3), keepdims=True)) / squashed.std(axis=(0, 2, 3), keepdims=True)
    info = model_info(name)

    def clipped(calib_kind: str, **pre) -> float:
        result = quantize(str(shared_model_path(name)), QuantizeConfig(wbits=8, abits=8, calib=calib_kind,
                                                                       progress=False, **pre), calib=squashed)
        act = result.plan.acts["input"]
        return float(np.mean(np.abs(act_fake_quant(real, act) - real) > act.scale / 2 * (1 + 1e-5)))

    assert clipped("data") > 0.05                    # a range fitted on them clips real pixels
    assert clipped("distill") < 1e-3                 # ±3σ of the synthetic images
    assert clipped("distill", mean=tuple(info["mean"]), std=tuple(info["std"])) == 0.0   # the exact range
