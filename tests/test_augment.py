"""Mirrored and shifted copies of the calibration images for GENIE-M."""

from __future__ import annotations

import numpy as np
import pytest

import fixtures
from onnxgenie.quant.augment import augment, shifted


def test_shift_moves_pixels_and_reflects_the_border():
    row = np.arange(10, dtype=np.float32).reshape(1, 1, 1, 10)
    assert shifted(row, 3, 2).ravel().tolist() == [2, 1, 0, 1, 2, 3, 4, 5, 6, 7]
    assert shifted(row, 3, -2).ravel().tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 8, 7]


@pytest.mark.parametrize("h_axis, w_axis", [(2, 3), (1, 2)])   # NCHW, NHWC
def test_copies_in_order_along_the_right_axes(h_axis, w_axis):
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    if w_axis == 2:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    assert augment(x, "none", h_axis, w_axis) is x
    flip = augment(x, "flip", h_axis, w_axis)
    assert flip.shape == (10, *x.shape[1:])
    np.testing.assert_array_equal(flip[:5], x)
    np.testing.assert_array_equal(flip[5:], np.flip(x, w_axis))
    four = augment(x, "flip-shift", h_axis, w_axis)
    assert four.shape == (20, *x.shape[1:]) and four.dtype == np.float32
    np.testing.assert_array_equal(four[:10], flip)
    right = np.take(four[10:15], np.arange(2, 32), axis=w_axis)   # moved 2 pixels right (32 / 16)
    np.testing.assert_array_equal(right, np.take(x, np.arange(0, 30), axis=w_axis))
    up = np.take(four[15:], np.arange(0, 30), axis=h_axis)        # the mirror moved 2 pixels up
    np.testing.assert_array_equal(up, np.take(np.flip(x, w_axis), np.arange(2, 32), axis=h_axis))


def test_pipeline_reconstructs_on_the_augmented_set_and_reports_it():
    from onnxgenie.pipeline import QuantizeConfig, quantize

    model = fixtures.conv_bn_net()
    x = fixtures.random_input(model, 8)
    config = QuantizeConfig(wbits=4, abits=4, reconstruct=True, recon_iters=2, recon_batch=4,
                            recon_augment="flip-shift", progress=False)
    report = quantize(model, config, calib=x).report
    assert report["reconstruction"]["images"] == 32 and report["reconstruction"]["augment"] == "flip-shift"
    assert report["calibration"]["images"] == 8


@pytest.mark.slow  # two reconstructions
def test_auto_mirrors_and_shifts_below_4_bit_weights_only():
    from onnxgenie.config import preset_config
    from onnxgenie.pipeline import quantize
    from onnxgenie.quant.augment import resolve

    assert preset_config("fast").recon_augment == "auto" and preset_config("paper").recon_augment == "none"
    assert [resolve("auto", b) for b in (2, 3, 4, 8)] == ["flip-shift", "flip-shift", "none", "none"]
    assert resolve("flip", 8) == "flip"
    model = fixtures.conv_bn_net()
    x = fixtures.random_input(model, 8)
    for wbits, images, mode in ((2, 32, "flip-shift"), (4, 8, "none")):
        config = preset_config("fast", wbits=wbits, abits=4, recon_iters=2, recon_batch=4, calib="data", progress=False)
        report = quantize(model, config, calib=x).report["reconstruction"]
        assert (report["images"], report["augment"]) == (images, mode)
    with pytest.raises(ValueError):
        augment(x, "auto")


def test_unknown_augmentation_is_bad_input():
    from onnxgenie.errors import BadInputError
    from onnxgenie.pipeline import QuantizeConfig, quantize

    with pytest.raises(BadInputError, match="recon-augment"):
        quantize(fixtures.conv_bn_net(), QuantizeConfig(reconstruct=True, recon_augment="rotate", calib_images=32,
                                                        progress=False))
