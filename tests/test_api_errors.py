"""``onnxgenie.quantize`` on bad input raises a documented ``onnxgenie.errors`` subclass, before any
work, with the one-line message the CLI would print: never a bare ValueError/TypeError or an
onnxruntime exception. Settings of the wrong type or range raise ``BadSettingError``, which is also a
``TypeError``."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import fixtures
import onnxgenie
from onnxgenie.errors import BadInputError, BadSettingError, OnnxGenieError, OutputExistsError

FAST = dict(calib_images=8, recon_iters=3, recon_batch=4, progress=False, threads=1)
IMAGES = np.random.default_rng(0).standard_normal((8, fixtures.C_IN, fixtures.HW, fixtures.HW)).astype(np.float32)


def _nan_images():
    x = IMAGES.copy()
    x[3, 1, 2, 2] = np.nan
    return x


CASES = {   # name: (keyword arguments, error class, words)
    "calib_wrong_shape": (dict(calib_data=IMAGES[:, :, :4, :4]), BadInputError, ("[8, 3, 4, 4]", "[N, 3, 8, 8]")),
    "calib_wrong_rank": (dict(calib_data=IMAGES[0]), BadInputError, ("[3, 8, 8]",)),
    "calib_nhwc_for_nchw_model": (dict(calib_data=IMAGES.transpose(0, 2, 3, 1)), BadInputError, ("[N, 3, 8, 8]",)),
    "calib_nan": (dict(calib_data=_nan_images()), BadInputError, ("nan/inf",)),
    "calib_empty": (dict(calib_data=IMAGES[:0]), BadInputError, ("n >= 1",)),
    "calib_strings": (dict(calib_data=np.array([["a"]])), BadInputError, ("float32 array",)),
    "calib_a_list_of_lists": (dict(calib_data=[[1.0]]), BadInputError, ("each item must be {'input': array}",)),
    "calib_an_int": (dict(calib_data=3), BadInputError, ("calib_data of type int",)),
    "calib_reader_of_strings": (dict(calib_data=[{"input": "pixels"}]), BadInputError, ("not numbers",)),
    "wbits_a_string": (dict(wbits="4"), BadSettingError, ("--wbits", "whole number")),
    "wbits_a_float": (dict(wbits=4.0), BadSettingError, ("--wbits", "whole number")),
    "calib_images_a_float": (dict(calib_images=8.5), BadSettingError, ("--calib-images",)),
    "seed_negative": (dict(seed=-3), BadSettingError, ("--seed", ">= 0")),
    "lambda_nan": (dict(lam=float("nan")), BadSettingError, ("--lambda", "finite")),
    "min_agreement_out_of_range": (dict(min_agreement=150), BadSettingError, ("--min-agreement", "<= 100")),
    "mean_a_string": (dict(mean="0.5", std=(1.0, 1.0, 1.0)), BadSettingError, ("--mean/--std",)),
    "exclude_a_string": (dict(exclude="stem.conv"), BadSettingError, ("--exclude", "list of node names")),
    "op_types_a_string": (dict(op_types="Conv"), BadSettingError, ("--op-types", "list of op types")),
    "unknown_setting": (dict(recon_itres=5), BadSettingError, ("unknown settings", "recon_itres")),
    "unknown_preset": (dict(preset="slow"), BadInputError, ("unknown preset",)),
    "progress_not_bool": (dict(progress="no"), BadSettingError, ("progress",)),
    "input_size_negative": (dict(input_size=(-8, 8)), BadSettingError, ("--input-size",)),
    "calib_unknown": (dict(calib="webcam"), BadSettingError, ("--calib 'webcam' is not one of",)),
    "quantizer_unknown": (dict(quantizer="brecq"), BadSettingError, ("--quantizer 'brecq' is not one of",)),
    "target_not_a_string": (dict(target=8), BadSettingError, ("--target 8 is not one of",)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_api_bad_input_raises_a_documented_error(case):
    kwargs, error, words = CASES[case]
    model = fixtures.conv_bn_net()
    before = model.SerializeToString()
    with pytest.raises(OnnxGenieError) as info:
        onnxgenie.quantize(model, **{**FAST, **kwargs})
    assert isinstance(info.value, error) and info.value.exit_code == 2
    message = str(info.value)
    assert "\n" not in message and ";" in message, message
    for word in words:
        assert word.lower() in message.lower(), message
    assert model.SerializeToString() == before


def test_bad_setting_is_also_a_type_error():
    with pytest.raises(TypeError):
        onnxgenie.quantize(fixtures.conv_bn_net(), wbits="4", **FAST)


@pytest.mark.parametrize("model_input", [123, b"model bytes", None], ids=["int", "bytes", "none"])
def test_api_refuses_a_model_that_is_neither_path_nor_proto(model_input):
    with pytest.raises(BadSettingError, match="give a path or an onnx.ModelProto"):
        onnxgenie.quantize(model_input, **FAST)


def test_api_bad_model_file_is_typed(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"not a model")
    with pytest.raises(BadInputError, match="not an ONNX model"):
        onnxgenie.quantize(tmp_path / "m.onnx", **FAST)


def test_api_wrong_calibration_file_is_typed(tmp_path):
    np.savez(tmp_path / "c.npz", images=np.zeros((4, 5, 5, 3), np.uint8))
    with pytest.raises(BadInputError, match="resize"):
        onnxgenie.quantize(fixtures.conv_bn_net(), calib_data=tmp_path / "c.npz", **FAST)


def test_api_quantizes_a_valid_array():
    """The same call with a valid array works (the cases above fail for their own reason only)."""
    result = onnxgenie.quantize(fixtures.conv_bn_net(), calib_data=IMAGES, **FAST)
    assert result.report["calibration"]["images"] == 8 and result.report["parity"] <= 1e-4


def test_api_never_writes_over_an_existing_output_from_a_model_proto(tmp_path):
    """A ModelProto with ``model_output`` follows the CLI's rule: an existing file is kept without
    ``overwrite`` (refused before any work) and replaced with it."""
    out = tmp_path / "q.onnx"
    out.write_bytes(b"an earlier result")
    with pytest.raises(OutputExistsError, match="exists; pass --overwrite"):
        onnxgenie.quantize(fixtures.conv_bn_net(), out, calib="noise", **FAST)
    assert out.read_bytes() == b"an earlier result" and sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]
    onnxgenie.quantize(fixtures.conv_bn_net(), out, calib="noise", overwrite=True, **FAST)
    onnx.checker.check_model(str(out))


def test_api_output_may_not_be_the_calibration_file(tmp_path):
    np.savez(tmp_path / "c.npz", images=np.zeros((8, fixtures.HW, fixtures.HW, fixtures.C_IN), np.uint8))
    before = (tmp_path / "c.npz").read_bytes()
    with pytest.raises(OutputExistsError, match="is the --calib-data file"):
        onnxgenie.quantize(fixtures.conv_bn_net(), tmp_path / "c.npz", calib_data=tmp_path / "c.npz",
                           overwrite=True, **FAST)
    assert (tmp_path / "c.npz").read_bytes() == before
