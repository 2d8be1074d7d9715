"""The settings' one declaration (onnxgenie.config): the command line is built from it and gives the
settings it names, a preset value may be a rule, and a rule may read the model (its multiply-adds)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import fixtures
from onnxgenie import config as cfg
from onnxgenie.cli import build_parser
from onnxgenie.config import PRESETS, SETTINGS, ModelFacts, QuantizeConfig, Rule, preset_config, settle
from onnxgenie.graph.load import normalize
from onnxgenie.resources import multiply_adds


def _quantize_args(*argv: str):
    return build_parser().parse_args(["quantize", "m.onnx", *argv])


def test_every_field_is_declared_and_every_flag_sets_its_field():
    assert set(SETTINGS) == {f.name for f in dataclasses.fields(QuantizeConfig)}
    quantize = {a.dest: a for a in build_parser().commands["quantize"]._actions}
    for name, setting in SETTINGS.items():
        if setting.flag is None:
            continue
        assert name in quantize and setting.flag_name in quantize[name].option_strings, name


def test_the_command_line_gives_the_settings_it_names():
    from onnxgenie.cli import QUANTIZE_SETTINGS, _settings

    args = _quantize_args("--wbits", "2", "--exclude", "a,b", "c", "--qdrop", "off", "--no-swing", "-q",
                          "--input-size", "16", "24", "--mean", "0.5", "0.4", "0.3", "--std", "0.2", "0.2", "0.2",
                          "--lambda", "0.5", "--recon-augment", "flip", "--jobs", "3", "--preset", "paper",
                          "--workdir", "on")
    config = preset_config(args.preset, **_settings(args, QUANTIZE_SETTINGS))
    assert (config.wbits, config.exclude, config.recon_qdrop, config.swing, config.progress) == \
        (2, ("a", "b", "c"), False, False, False)
    assert (config.input_size, config.mean, config.lam, config.recon_augment, config.jobs) == \
        ((16, 24), (0.5, 0.4, 0.3), 0.5, "flip", 3)
    assert config.workdir == "on"   # a folder's name, not a switch word
    assert config.recon_iters == PRESETS["paper"]["recon_iters"] and config.preset == "paper"
    plain = preset_config(**_settings(_quantize_args(), QUANTIZE_SETTINGS))
    assert plain == preset_config("fast")   # nothing given: the preset's values and the defaults


def test_the_fast_presets_rules_are_settled_by_bit_width():
    fast = preset_config("fast")
    assert (fast.recon_act_lr_scale, fast.recon_candidates, fast.recon_augment) == (None, None, "auto")
    w2 = settle(dataclasses.replace(fast, wbits=2))
    w4 = settle(fast)
    assert (w2.recon_act_lr_scale, w2.recon_candidates, w2.recon_augment) == (1.0, 2, "flip-shift")
    assert (w4.recon_act_lr_scale, w4.recon_candidates, w4.recon_augment) == (64.0, 1, "none")
    assert settle(w4) == w4   # a settled config stays as it is


@pytest.mark.parametrize("name, size", [("resnet20_cifar10", "small"), ("efficientnet_lite0_imagenet", "large")])
def test_the_fast_budget_follows_the_models_cost(name, size):
    """ResNet-20 at 32x32 gets the small budget, EfficientNet-Lite0 at 224x224 the large one; 8-bit weights
    and activations skip GENIE-M on the large model only; a value given on the command line stays."""
    from conftest import shared_model_path
    facts = ModelFacts(normalize(onnx.load(shared_model_path(name))))
    budget = cfg.FAST_BUDGET[size]
    w4, w8 = (settle(preset_config("fast", wbits=b, abits=b), facts) for b in (4, 8))
    assert {k: getattr(w4, k) for k in budget} == budget and w4.reconstruct
    assert w8.reconstruct is (size == "small")
    assert settle(preset_config("fast", calib_images=32), facts).calib_images == 32


def _tiny_macs_model() -> onnx.ModelProto:
    """Conv 3->4, 3x3, pad 1 on 8x8 (4*8*8 outputs x 3*3*3 = 6912), Flatten, Gemm 256->10 (2560), MatMul
    [10] x [10, 7] (70): 9542 multiply-adds per image."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
             for n, s in (("w", (4, 3, 3, 3)), ("fc", (10, 256)), ("fb", (10,)), ("mm", (10, 7)))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fb"], ["g"], transB=1),
             helper.make_node("MatMul", ["g", "mm"], ["y"])]
    graph = helper.make_graph(nodes, "macs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 7])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_multiply_adds_of_one_image():
    assert multiply_adds(_tiny_macs_model()) == 6912 + 2560 + 70


def test_a_rule_may_read_the_model_and_is_one_declaration(monkeypatch):
    """A budget chosen by the model's cost: a setting declared with a Rule that reads the multiply-adds,
    a preset that leaves the setting to it. The same settings give 200 steps on an 8x8 model and 100 at
    64x64; --help says the rule in words."""
    big = 10 * multiply_adds(normalize(fixtures.conv_bn_net()))
    rule = Rule(lambda c, m: 100 if m.multiply_adds > big else 200,
                "200 below ten times the 8x8 net's multiply-adds, else 100", reads_model=True)
    monkeypatch.setitem(SETTINGS, "distill_iters", dataclasses.replace(SETTINGS["distill_iters"], rule=rule))
    monkeypatch.setitem(PRESETS, "fast", {**PRESETS["fast"], "distill_iters": None})
    config = preset_config("fast")
    assert config.distill_iters is None
    small, large = (ModelFacts(normalize(fixtures.conv_bn_net(hw=(s, s)))) for s in (8, 64))
    assert large.multiply_adds > big > small.multiply_adds
    assert settle(config, small).distill_iters == 200 and settle(config, large).distill_iters == 100
    help_text = next(a.help for a in build_parser().commands["quantize"]._actions if a.dest == "distill_iters")
    assert "fast: 200 below ten times the 8x8 net's multiply-adds, else 100; paper: 4000" in help_text


def test_a_rule_that_answers_out_of_range_is_refused(monkeypatch):
    rule = Rule(lambda c, m: 0, "always 0")
    monkeypatch.setitem(SETTINGS, "recon_iters", dataclasses.replace(SETTINGS["recon_iters"], rule=rule))
    with pytest.raises(cfg.BadSettingError, match="--recon-iters must be a whole number >= 1"):
        settle(QuantizeConfig(recon_iters=None))
