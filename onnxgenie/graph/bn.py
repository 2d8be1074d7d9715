"""BatchNormalization statistics (the only 'data' a zero-shot method has) and BN folding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..builder import GraphBuilder, attr, value_infos
from ..errors import NoBatchNormError

FOLDABLE_PRODUCERS = ("Conv", "Gemm")


@dataclass
class BNLayer:
    name: str
    input: str            # the tensor whose training-set statistics the layer stores
    output: str
    mean: np.ndarray
    var: np.ndarray
    eps: float
    gamma: np.ndarray
    beta: np.ndarray
    producer: str | None  # name of the node producing ``input``
    producer_op: str | None

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var + self.eps)


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def bn_layers(model: onnx.ModelProto) -> list[BNLayer]:
    inits = initializers(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    layers = []
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        x, gamma, beta, mean, var = node.input[:5]
        if not all(t in inits for t in (gamma, beta, mean, var)):
            continue  # statistics computed at run time: nothing stored to learn from
        prod = producers.get(x)
        layers.append(BNLayer(
            name=node.name or node.output[0], input=x, output=node.output[0],
            mean=inits[mean].astype(np.float32), var=inits[var].astype(np.float32),
            eps=float(attr(node, "epsilon", 1e-5)), gamma=inits[gamma].astype(np.float32),
            beta=inits[beta].astype(np.float32),
            producer=(prod.name or prod.output[0]) if prod is not None else None,
            producer_op=prod.op_type if prod is not None else None))
    return layers


def folded_bn(model: onnx.ModelProto) -> str | None:
    """Which exporter folded the model's BN layers into its convolutions, from the traces it leaves
    (None when there are none): torch.export's optimiser records its rewrite rule in the node
    metadata; TensorFlow's constant folding (tf2onnx) keeps the BN's name on the merged tensors."""
    for node in model.graph.node:
        if node.op_type not in FOLDABLE_PRODUCERS:
            continue
        meta = " ".join(p.value for p in getattr(node, "metadata_props", ()))
        if "FuseBatchNorm" in meta:
            return "torch"
        names = " ".join(node.input[1:]).lower()
        if "fused_bn" in names:
            return "tf2onnx"
        if "batchnorm" in names.replace("_", ""):
            return "keras3"
    return None


FOLDED_FIX = {  # what follows "pass real images with --calib-data"
    "torch": ", or re-export with torch.onnx.export(..., dynamo=True, optimize=False)",
    "tf2onnx": ", or re-export with tf2onnx.convert.from_keras(..., optimizers=...) without its "
               "remove_back_to_back optimiser (README, 'Export your model')",
    "keras3": ", or re-export it on Keras's torch backend (KERAS_BACKEND=torch) with torch.onnx.export(..., "
              "dynamo=False, do_constant_folding=False): no tf2onnx option keeps Keras 3's BN",
}


def require_bn(model: onnx.ModelProto, original: onnx.ModelProto | None = None) -> list[BNLayer]:
    """The BN layers of ``model``, or a NoBatchNormError saying why there are none and what to do;
    ``original`` (the file as exported) is read for the traces of BN folded by the exporter."""
    layers = bn_layers(model)
    if layers:
        return layers
    folder = folded_bn(original if original is not None else model)
    if folder is not None:
        raise NoBatchNormError(
            "the model has its BN folded into the convolutions by the exporter, so the BN statistics zero-shot "
            f"quantization needs are gone; pass real images with --calib-data{FOLDED_FIX[folder]}")
    raise NoBatchNormError(
        "the model has no BatchNormalization layers, and zero-shot quantization needs their statistics; "
        "re-export from PyTorch with do_constant_folding=False and training=TrainingMode.PRESERVE "
        "(or dynamo export with optimize=False), or pass real images with --calib-data")


def _consumers(model: onnx.ModelProto, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if tensor in n.input]


def _affine(bn: BNLayer) -> tuple[np.ndarray, np.ndarray]:
    a = (bn.gamma / bn.std).astype(np.float32)
    return a, (bn.beta - bn.mean * a).astype(np.float32)


def _replace_init(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
            return
    model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))


def _fold_into(model: onnx.ModelProto, prod: onnx.NodeProto, bn: BNLayer, inits: dict) -> bool:
    """Scale ``prod``'s weight and bias by ``bn``; ``inits`` (name -> array) is kept up to date."""
    a, b = _affine(bn)
    w = inits.get(prod.input[1]) if len(prod.input) > 1 else None
    if w is None or sum(1 for n in model.graph.node for i in n.input if i == prod.input[1]) != 1:
        return False
    if prod.op_type == "Conv":
        w_new = w * a.reshape(-1, *([1] * (w.ndim - 1)))
    elif prod.op_type == "Gemm" and attr(prod, "alpha", 1.0) == 1.0 and attr(prod, "beta", 1.0) == 1.0:
        w_new = w * (a[:, None] if attr(prod, "transB", 0) else a[None, :])
    else:
        return False
    bias_name = prod.input[2] if len(prod.input) > 2 and prod.input[2] else None
    if bias_name is not None and bias_name not in inits:
        return False
    old_bias = inits[bias_name] if bias_name else np.zeros_like(a)
    if old_bias.shape != a.shape:
        return False
    bias_name = bias_name or f"{prod.input[1]}_bnfold_bias"
    for name, value in ((prod.input[1], w_new), (bias_name, old_bias * a + b)):
        _replace_init(model, name, value)
        inits[name] = value.astype(np.float32)
    while len(prod.input) < 3:
        prod.input.append("")
    prod.input[2] = bias_name
    return True


def _as_mul_add(model: onnx.ModelProto, node: onnx.NodeProto, bn: BNLayer) -> list[onnx.NodeProto]:
    a, b = _affine(bn)
    shape = (1, -1) + (1,) * max(_rank(model, bn.input) - 2, 0)  # channels on axis 1
    g = GraphBuilder()
    scaled = g.op("Mul", bn.input, g.const(a.reshape(shape), f"{bn.name}_scale"), out=f"{bn.output}_scaled",
                  name=f"{bn.name}_mul")
    g.op("Add", scaled, g.const(b.reshape(shape), f"{bn.name}_shift"), out=bn.output, name=f"{bn.name}_add")
    model.graph.initializer.extend(g.inits)
    return g.nodes


def _rank(model: onnx.ModelProto, tensor: str) -> int:
    vi = value_infos(model).get(tensor)
    if vi is not None and vi.type.tensor_type.HasField("shape"):
        return len(vi.type.tensor_type.shape.dim)
    return 4


def fold_bn(model: onnx.ModelProto, fold_into_producer: bool = True,
            keep: frozenset[str] = frozenset()) -> onnx.ModelProto:
    """Fold every BN into the Conv/Gemm producing its input; otherwise write it as Mul+Add.

    With ``fold_into_producer=False`` every BN becomes its eval-mode Mul+Add form, which is what a
    training graph needs (ORT turns any BatchNormalization into training mode); so do the BN layers
    whose outputs ``keep`` names.
    """
    out = onnx.shape_inference.infer_shapes(model)  # a copy, with the ranks _as_mul_add needs
    layers = {layer.output: layer for layer in bn_layers(out)}
    producers = {o: n for n in out.graph.node for o in n.output}
    inits = initializers(out)
    new_nodes = []
    for node in out.graph.node:
        bn = layers.get(node.output[0]) if node.op_type == "BatchNormalization" else None
        if bn is None:
            new_nodes.append(node)
            continue
        prod = producers.get(bn.input)
        if (fold_into_producer and bn.output not in keep and prod is not None and prod.op_type in FOLDABLE_PRODUCERS
                and len(_consumers(out, bn.input)) == 1
                and bn.input not in {o.name for o in out.graph.output}
                and _fold_into(out, prod, bn, inits)):
            prod.output[0] = bn.output  # the conv now writes the BN's output directly
            continue
        new_nodes.extend(_as_mul_add(out, node, bn))
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    _drop_unused_initializers(out)
    del out.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(out)


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
