"""Load an exported classifier and normalise it into the one form every later stage reads.

Normal form: opset ``INTERNAL_OPSET`` (17: what the PyTorch TorchScript exporter writes, inside
onnxruntime-training's tested range, and the last opset where ReduceMean/Squeeze take their axes
as attributes, which keeps hand-built loss graphs simple), constant subgraphs folded (the
Shape→Gather→… debris of exported shortcuts and channel shuffles), shapes inferred, topologically
sorted, one NCHW float image input with a symbolic batch axis and one logits output.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import defs, helper, numpy_helper, shape_inference, version_converter

from ..builder import GraphBuilder, attr
from ..builder import attrs as node_attrs
from ..errors import BadInputError, UnsupportedModelError
from ..ortrain import inference_session, quiet_logger, quiet_run_options
from .bn_arith import restore_batchnorm

INTERNAL_OPSET = 17
INTERNAL_IR = 8
MAX_IR = 10  # the newest IR onnxruntime(-training) 1.19 reads
MIN_OPSET = 7
_FOLD_BATCH = 7  # an unusual batch size: folded Reshape targets that carry it get it back as -1
_OTHER_BATCH = 5  # a second fold shows which constants the batch size went into
_SUPPORTED_DOMAINS = {"", "ai.onnx"}


@dataclass(frozen=True)
class ImageIO:
    input: str
    chw: tuple[int, int, int]
    output: str
    num_classes: int


def load_model(src: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Read and check a model. The source is never modified (a ModelProto is copied)."""
    if isinstance(src, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(src)
    else:
        path = Path(src)
        if not path.exists():
            raise BadInputError(f"{path}: no such file; give the path of an .onnx model")
        if path.is_dir():
            raise BadInputError(f"{path} is a directory; give the path of an .onnx model file")
        if not path.is_file():
            raise BadInputError(f"{path} is not a regular file; give the path of an .onnx model file")
        data = path.read_bytes()
        if not data:
            raise BadInputError(f"{path} is empty; re-export the model to ONNX")
        model = onnx.ModelProto()
        try:
            model.ParseFromString(data)
        except Exception:
            raise BadInputError(f"{path} is not an ONNX model (unreadable protobuf, or truncated); "
                                "re-export it or copy it again") from None
        _read_external_data(model, path)
    if isinstance(src, onnx.ModelProto):
        external = next((t.name for t in _tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL), None)
        if external is not None:
            raise BadInputError(f"tensor {external} of the given ModelProto keeps its data in an external file, "
                                "which is read only from a model's own folder; pass the model's path instead, or "
                                "load it with onnx.load(path)")
    if not model.graph.node or not model.opset_import:
        raise BadInputError("the file holds no ONNX graph (protobuf without nodes or opset); "
                            "re-export the model to ONNX")
    _name_nodes(model.graph)
    if model.ir_version > MAX_IR:
        raise UnsupportedModelError(
            f"the model has ONNX IR version {model.ir_version}, newer than onnxruntime-training 1.19 reads "
            f"(<= {MAX_IR}); re-export it with opset 17 (or down-convert it with onnx<=1.17)")
    try:
        onnx.checker.check_model(model)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BadInputError(f"the model fails onnx.checker ({first}); re-export it with a current exporter") \
            from None
    return model


def _tensors(graph: onnx.GraphProto):
    """Every TensorProto that holds data in ``graph`` and its subgraphs (initializers, Constant values)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _tensors(sub)


def _data_bytes(tensor: onnx.TensorProto) -> int | None:
    """The bytes ``tensor``'s raw data takes (None for strings, which have no fixed size)."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    count = int(np.prod(tensor.dims, dtype=np.int64))
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (count + 1) // 2
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _read_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Read the weights a model keeps in files beside it into the model. Every location is resolved
    (links included) and must lie inside the model's folder; the file must hold exactly the bytes the
    tensor's shape needs."""
    folder = os.path.realpath(path.parent)
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        where = f"{path}: tensor {tensor.name} keeps its external weight data in {location!r}"
        try:
            real = os.path.realpath(os.path.join(path.parent, location))
            inside = real != folder and os.path.commonpath([folder, real]) == folder
        except ValueError:   # a NUL byte in the location
            real, inside = "", False
        if not location or os.path.isabs(location) or not inside:
            raise BadInputError(f"{where}, which is outside the model's folder {folder} (links are followed); keep "
                                "the data file itself next to the model")
        if not os.path.isfile(real):
            raise BadInputError(f"{where}, which is missing; keep the data file next to the model")
        need = _data_bytes(tensor)
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
        except ValueError:
            raise BadInputError(f"{where} with a non-numeric offset or length; re-export the model") from None
        size = os.path.getsize(real)
        length = size - offset if length < 0 else length
        if need is None or offset < 0 or length != need:
            raise BadInputError(f"{where} ({length} bytes at offset {offset}), but its type and shape "
                                f"{list(tensor.dims)} need {need} bytes; re-export the model with its data")
        if offset + length > size:
            raise BadInputError(f"{where}, {length} bytes at offset {offset}, but the file has only {size} bytes "
                                "(truncated); copy the data file again or re-export the model")
        with open(real, "rb") as fh:
            fh.seek(offset)
            tensor.raw_data = fh.read(length)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The files the model at ``path`` keeps its weights in (for the no-clobber check); [] if unreadable."""
    path = Path(path)
    model = onnx.ModelProto()
    try:
        model.ParseFromString(path.read_bytes())
    except Exception:
        return []
    locations = {dict((e.key, e.value) for e in t.external_data).get("location", "")
                 for t in _tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL}
    return [path.parent / loc for loc in sorted(locations) if loc]


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give every node a unique name (onnxruntime refuses duplicates; plans are keyed by name): a node
    without one, or repeating an earlier one, is named after its first output."""
    taken: set[str] = set()
    renamed = []
    for node in graph.node:
        if node.name and node.name not in taken:
            taken.add(node.name)
        else:
            renamed.append(node)
    for index, node in enumerate(renamed):
        base = (node.output[0] if node.output and node.output[0] else "") or f"{node.op_type}_{index}"
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        node.name = name
        taken.add(name)


def model_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in _SUPPORTED_DOMAINS), 0)


def _check_ops(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        if node.domain not in _SUPPORTED_DOMAINS:
            raise UnsupportedModelError(
                f"node {node.name or node.op_type} uses the custom op {node.domain}::{node.op_type}, which "
                "this tool cannot run or differentiate; export the model with standard ONNX ops only")


def _image_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise UnsupportedModelError(
            f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); an image classifier "
            "with exactly one image input is expected, so export the model with a single input")
    inp = inputs[0]
    elem = inp.type.tensor_type.elem_type
    if elem in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE):
        raise UnsupportedModelError(
            f"input {inp.name} is {onnx.TensorProto.DataType.Name(elem)}; export the model in float32 "
            "(in PyTorch: model.float() and a float32 example input)")
    if elem != onnx.TensorProto.FLOAT:
        name = onnx.TensorProto.DataType.Name(elem)
        raise UnsupportedModelError(
            f"input {inp.name} is {name}, not a float image; export the model with a float32 NCHW (or NHWC) "
            "image input and do the integer-to-float conversion in preprocessing")
    if len(inp.type.tensor_type.shape.dim) != 4:
        raise UnsupportedModelError(
            f"input {inp.name} has rank {len(inp.type.tensor_type.shape.dim)}; a 4-D image input "
            "(NCHW, or NHWC followed by a Transpose) is expected")
    return inp


def _dims(vi: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]


def _set_dims(vi: onnx.ValueInfoProto, dims: list[int | str]) -> None:
    shape = vi.type.tensor_type.shape
    for d, v in zip(shape.dim, dims):
        d.Clear()
        if isinstance(v, int):
            d.dim_value = v
        else:
            d.dim_param = v


# Ops whose versions after 17 only added types or optional attributes: same meaning at opset 17
# as long as the attributes listed here are absent (the checker rejects new types after relabelling).
_NEW_ATTRS_SINCE_17 = {"AveragePool": {"dilations"}, "Resize": {"antialias", "axes", "keep_aspect_ratio_policy"},
                       "Split": {"num_outputs"}, "LpPool": {"ceil_mode"}, "Cast": {"saturate"},
                       "CastLike": {"saturate"}, "QuantizeLinear": {"saturate", "block_size", "output_dtype"},
                       "DequantizeLinear": {"block_size"}}
_REDUCE_AXES_INPUT_SINCE_18 = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
                               "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSumSquare"}


def _same_meaning_at_17(node: onnx.NodeProto, attrs: dict) -> bool:
    """False for the post-17 versions whose meaning changed (new modes, axes moved to inputs)."""
    if node.op_type == "Pad":  # 18: optional axes input; 19: mode 'wrap'
        return attrs.get("mode", b"constant") != b"wrap" and (len(node.input) < 4 or not node.input[3])
    if node.op_type in ("ScatterElements", "ScatterND"):  # 18: reduction max/min
        return attrs.get("reduction", b"none") in (b"none", b"add", b"mul")
    return node.op_type not in ("DFT", "GridSample")  # 20: axis as input; renamed modes


def _downgrade_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Relabel a newer-opset model as opset 17 where every op means the same there.

    onnx 1.17's version converter has no down-adapters for most ops (it fails on Flatten-21,
    AveragePool-19, Reshape-19), but the versions after 17 are mostly type additions; the few real
    changes are rewritten or refused. Runs on the folded graph, where inputs such as ReduceMean-18's
    axes (a Constant -> Reshape chain in torch.export files) are initializers.
    """
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    for node in model.graph.node:
        if node.domain not in _SUPPORTED_DOMAINS:
            continue
        try:
            since = defs.get_schema(node.op_type, opset, "").since_version
        except Exception:
            since = opset
        if since <= INTERNAL_OPSET:
            continue
        label = f"{node.op_type}-{since} (node {node.name or node.output[0]})"
        attrs = node_attrs(node)
        try:
            defs.get_schema(node.op_type, INTERNAL_OPSET, "")
        except Exception:
            raise UnsupportedModelError(f"{label} does not exist at opset {INTERNAL_OPSET}; re-export the model "
                                        f"with opset {INTERNAL_OPSET} so the exporter decomposes it") from None
        if node.op_type in _REDUCE_AXES_INPUT_SINCE_18:
            if len(node.input) > 1 and node.input[1]:
                if node.input[1] not in consts:
                    raise UnsupportedModelError(f"{label} takes its axes at run time; re-export the model "
                                                f"with opset {INTERNAL_OPSET}")
                node.attribute.append(helper.make_attribute("axes", [int(a) for a in consts[node.input[1]].ravel()]))
                del node.input[1:]
            elif attrs.get("noop_with_empty_axes", 0):
                raise UnsupportedModelError(f"{label} has noop_with_empty_axes=1; re-export the model with "
                                            f"opset {INTERNAL_OPSET}")
            for i, a in enumerate(node.attribute):
                if a.name == "noop_with_empty_axes":
                    del node.attribute[i]
                    break
            continue
        bad = _NEW_ATTRS_SINCE_17.get(node.op_type, set()) & set(attrs)
        if bad or not _same_meaning_at_17(node, attrs):
            what = f"attribute {sorted(bad)[0]}" if bad else "semantics that opset 17 lacks"
            raise UnsupportedModelError(f"{label} uses {what}; re-export the model with opset {INTERNAL_OPSET}")
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", INTERNAL_OPSET))
    model.ir_version = INTERNAL_IR
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise UnsupportedModelError(f"the opset-{opset} model is not valid as opset {INTERNAL_OPSET} ({first}); "
                                    f"re-export the model with opset {INTERNAL_OPSET}") from None
    return model


def _convert_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    opset = model_opset(model)
    if opset < MIN_OPSET:
        raise UnsupportedModelError(f"opset {opset} is below the oldest supported ({MIN_OPSET}); "
                                    "re-export the model with opset 13 or newer")
    if opset > INTERNAL_OPSET:
        return _downgrade_opset(model, opset)
    if opset != INTERNAL_OPSET:
        try:
            model = version_converter.convert_version(model, INTERNAL_OPSET)
        except Exception as err:
            raise UnsupportedModelError(
                f"cannot convert opset {opset} to {INTERNAL_OPSET} ({str(err).splitlines()[0][:120]}); "
                "re-export the model with opset 17") from None
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", INTERNAL_OPSET))
    model.ir_version = INTERNAL_IR
    return model


MAX_FOLD_PASSES = 16


def _castlike_as_cast(model: onnx.ModelProto) -> None:
    """CastLike(constant, x) as Cast(constant, to=x's type): the same value, and one that folding can
    compute (torch.export writes a bias-free Conv's zero bias as CastLike(0, input) -> Expand)."""
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    for node in model.graph.node:
        if node.op_type == "CastLike" and node.domain in _SUPPORTED_DOMAINS and types.get(node.input[1]):
            to = types[node.input[1]]
            node.op_type = "Cast"
            del node.input[1:]
            del node.attribute[:]   # saturate (opset 19+) only concerns float8 targets
            node.attribute.append(helper.make_attribute("to", to))


def _drop_identity_casts(model: onnx.ModelProto) -> None:
    """Remove Casts to the type their input already has (Keras 3's torch backend writes one around
    nearly every op; they hide an NHWC input's Transpose and the Conv before a BN)."""
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(model.graph.value_info) + list(model.graph.input)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    outputs = {o.name for o in model.graph.output}
    rename = {n.output[0]: n.input[0] for n in model.graph.node
              if n.op_type == "Cast" and n.domain in _SUPPORTED_DOMAINS and n.output[0] not in outputs
              and types.get(n.input[0]) and types[n.input[0]] == attr(n, "to")}
    if not rename:
        return
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            while name in rename:
                name = rename[name]
            node.input[i] = name
    keep = [n for n in model.graph.node if not (n.op_type == "Cast" and n.output[0] in rename)]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _shape_range_as_slice(model: onnx.ModelProto) -> None:
    """Shape(x, start, end) as Slice(Shape(x)): graphsurgeon 0.6 folds a Shape to the whole shape,
    ignoring start/end (torch.export reads the batch size as Shape(input, end=1))."""
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: a.i for a in node.attribute}
        if node.op_type != "Shape" or not ({"start", "end"} & set(attrs)):
            nodes.append(node)
            continue
        start, end = attrs.get("start", 0), attrs.get("end", np.iinfo(np.int64).max)
        out, b = node.output[0], GraphBuilder()
        bounds = [b.const(np.array([v], np.int64), f"{out}.{k}") for k, v in (("start", start), ("end", end))]
        b.op("Slice", b.op("Shape", node.input[0], out=f"{out}.full", name=f"{node.name}.full"), *bounds, out=out,
             name=node.name)
        model.graph.initializer.extend(b.inits)
        nodes += b.nodes
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _fold(model: onnx.ModelProto) -> onnx.ModelProto:
    quiet_logger()  # graphsurgeon folds with onnxruntime, which warns about every Unsqueeze
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR  # its large-tensor warnings went to stdout
    # A pass folds only the Shape ops whose input shape is known; a Reshape whose target it just folded
    # (a channel shuffle) gets its static shape from the next inference: repeat until nothing folds.
    nodes = None
    for _ in range(MAX_FOLD_PASSES):
        del model.graph.value_info[:]
        inferred = shape_inference.infer_shapes(model)
        _castlike_as_cast(inferred)
        _drop_identity_casts(inferred)
        _shape_range_as_slice(inferred)
        graph = gs.import_onnx(inferred)
        graph.fold_constants(error_ok=True).cleanup().toposort()
        model = gs.export_onnx(graph)
        _cancel_transpose_pairs(model)
        if len(model.graph.node) == nodes:
            break
        nodes = len(model.graph.node)
    return shape_inference.infer_shapes(model)


def _perm(node: onnx.NodeProto) -> list[int] | None:
    perm = attr(node, "perm")
    return None if perm is None else list(perm)


def _cancel_transpose_pairs(model: onnx.ModelProto) -> None:
    """Drop Transpose -> Transpose pairs that undo each other (tf2onnx leaves one around every
    layout-sensitive op when its back-to-back optimiser, which also folds BN into Conv, is off)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    outputs = {o.name for o in model.graph.output}
    rename: dict[str, str] = {}
    for node in model.graph.node:
        first = producers.get(node.input[0]) if node.op_type == "Transpose" else None
        if first is None or first.op_type != "Transpose" or node.output[0] in outputs:
            continue
        p1, p2 = _perm(first), _perm(node)
        if p1 is not None and p2 is not None and len(p1) == len(p2) and [p1[i] for i in p2] == list(range(len(p1))):
            rename[node.output[0]] = first.input[0]
    if not rename:
        return
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            while name in rename:
                name = rename[name]
            node.input[i] = name
    keep = [n for n in model.graph.node if n.op_type != "Transpose" or n.output[0] not in rename]
    used = {i for n in keep for i in n.input} | outputs
    keep = [n for n in keep if n.op_type != "Transpose" or any(o in used for o in n.output)]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _pads_into_convs(model: onnx.ModelProto) -> None:
    """Fold a zero constant Pad of the spatial axes into the Convs that read it (their ``pads``):
    the same function, and one full-tensor copy (and its gradient) fewer per layer. Exporters write
    TensorFlow-style "same" padding this way (EfficientNet-Lite: 17 Pads)."""
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    folded = set()
    for pad in model.graph.node:
        if pad.op_type != "Pad" or pad.domain not in _SUPPORTED_DOMAINS or pad.output[0] in outputs:
            continue
        mode = attr(pad, "mode", b"constant")
        pads = consts.get(pad.input[1]) if len(pad.input) > 1 else None
        value = consts.get(pad.input[2], np.zeros(1)) if len(pad.input) > 2 and pad.input[2] else np.zeros(1)
        axes_given = len(pad.input) > 3 and pad.input[3]
        convs = readers.get(pad.output[0], [])
        if mode not in (b"constant", "constant") or pads is None or axes_given or np.any(value != 0) \
                or pads.size != 8 or np.any(pads < 0) or np.any(pads[[0, 1, 4, 5]] != 0) or not convs:
            continue
        if not all(c.op_type == "Conv" and c.input[0] == pad.output[0] and len(c.input) >= 2 and all(
                a.name != "auto_pad" or helper.get_attribute_value(a) in (b"NOTSET", "NOTSET") for a in c.attribute)
                for c in convs):
            continue
        extra = [int(pads[2]), int(pads[3]), int(pads[6]), int(pads[7])]   # Conv's [h0, w0, h1, w1]
        for conv in convs:
            current = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0, 0, 0, 0])
            kept = [a for a in conv.attribute if a.name != "pads"]
            del conv.attribute[:]
            conv.attribute.extend(kept + [helper.make_attribute("pads", [p + e for p, e in zip(current, extra)])])
            conv.input[0] = pad.input[0]
        folded.add(pad.output[0])
    if folded:
        keep = [n for n in model.graph.node if not (n.op_type == "Pad" and n.output[0] in folded)]
        del model.graph.node[:]
        model.graph.node.extend(keep)


def with_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A copy of ``model`` (normal form) whose image input has the static batch ``batch``, shapes inferred."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    image = next(i for i in fixed.graph.input if i.name == image_io(fixed).input)
    _set_dims(image, [batch, *_dims(image)[1:]])
    del fixed.graph.value_info[:]
    return shape_inference.infer_shapes(fixed)


def _unfix_batch(model: onnx.ModelProto, batch: int) -> None:
    """A fixed-batch export bakes its batch into Reshape targets (``x.view(x.size(0), -1)`` becomes
    ``[1, -1]``); give those the folding batch so that ``_restore_dynamic_batch`` frees them."""
    consts = {t.name: t for t in model.graph.initializer}
    consts.update({n.output[0]: n.attribute[0].t for n in model.graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    for node in model.graph.node:
        if node.op_type != "Reshape" or node.input[0] in consts or node.input[1] not in consts:
            continue
        tensor = consts[node.input[1]]
        target = numpy_helper.to_array(tensor)
        if target.ndim == 1 and target.size > 1 and target[0] == batch:
            target = target.copy()
            target[0] = _FOLD_BATCH
            tensor.CopyFrom(numpy_helper.from_array(target, tensor.name))


def dynamic_batch_fix(model: onnx.ModelProto, chw_dims: list) -> str:
    """How to re-export ``model`` with a dynamic batch, for the exporter that wrote it (``chw_dims``:
    its input's dimensions after the batch)."""
    inp, out = _image_input(model).name, model.graph.output[0].name
    torch_fix = (f"torch.onnx.export(..., dynamo=True, dynamic_shapes=({{0: torch.export.Dim('N')}},)), or with "
                 f"dynamo=False: input_names=['{inp}'], output_names=['{out}'], "
                 f"dynamic_axes={{'{inp}': {{0: 'N'}}, '{out}': {{0: 'N'}}}}")
    tf_fix = (f"tf2onnx: input_signature=(tf.TensorSpec((None, {', '.join(map(str, chw_dims))}), tf.float32, "
              f"name='{inp}'),)")
    return {"pytorch": torch_fix, "tf2onnx": tf_fix}.get(model.producer_name, f"{torch_fix}; {tf_fix}")


def _failure(err: Exception) -> str:
    found = re.search(r"running (\w+) node\. Name:'([^']*)'", str(err))
    return f"{found[1]} node {found[2]}" if found else (str(err).splitlines() or [type(err).__name__])[0][:100]


def _check_batch_is_free(exported: onnx.ModelProto, model: onnx.ModelProto, batch: int) -> None:
    """Refuse a fixed-batch export whose normal form (batch freed) does not compute, one image or
    ``batch + 1`` images at a time, what the file computes ``batch`` images at a time: the batch took
    part in the computation (a Reshape to [batch * channels, -1], a constant with a batch axis)."""
    quiet = quiet_run_options()  # the failure is reported below, in one line
    shape = _dims(_image_input(model))[1:]
    x = np.random.default_rng(0).standard_normal((2 * batch, *shape)).astype(np.float32)
    try:
        file = inference_session(exported)
        name = file.get_inputs()[0].name
        want = np.concatenate([file.run(None, {name: x[i:i + batch]}, quiet)[0] for i in (0, batch)])
    except Exception:  # not runnable as written: only the shapes are checked
        want = None
    problem, sess = None, inference_session(model)
    for n in (1, batch + 1):
        try:
            got = sess.run(None, {image_io(model).input: x[:n]}, quiet)[0]
        except Exception as err:
            problem = f"at batch {n} it fails in {_failure(err)}"
            break
        if got.shape[0] != n:
            problem = f"at batch {n} it gives {got.shape[0]} outputs"
            break
        if want is not None and not np.abs(got - want[:n]).max() <= 1e-4 * max(1.0, float(np.abs(want).max())):
            problem = f"at batch {n} it computes other outputs than the file does {batch} at a time"
            break
    if problem is not None:
        raise UnsupportedModelError(
            f"the model was exported with a fixed batch size of {batch} that cannot be made dynamic ({problem}); "
            f"re-export it with a dynamic batch: {dynamic_batch_fix(exported, shape)}")


WEIGHT_ELEMENTS = 1024  # float initializers this large are weights, not shape arithmetic


def _at_batch(model: onnx.ModelProto, batch: int, dims: list, fixed_batch: int | None,
              weights: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` with the image input (``dims``) and the outputs at batch ``batch``; without
    ``weights``, the large float initializers become inputs of their shape (a fold then computes the
    same shape arithmetic in a fraction of the time)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _set_dims(_image_input(out), [batch, *dims[1:]])
    for vi in out.graph.output:
        odims = _dims(vi)
        if odims and (not isinstance(odims[0], int) or odims[0] == fixed_batch):
            _set_dims(vi, [batch, *odims[1:]])
    del out.graph.value_info[:]
    if not weights:
        floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
        large = [t for t in out.graph.initializer if t.data_type in floats and np.prod(t.dims) >= WEIGHT_ELEMENTS]
        for t in large:
            out.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
            out.graph.initializer.remove(t)
    return out


def _free_batch_dependent_targets(model: onnx.ModelProto, other: onnx.ModelProto) -> None:
    """Constants that differ between the folds at ``_FOLD_BATCH`` (``model``) and ``_OTHER_BATCH``
    (``other``, folded without its weights: constants computed from weights are absent there) were
    computed from the batch size. A Reshape target with one such entry, the batch times a constant
    (``x.view(n * c, -1)``, a channel shuffle's ``n``), gets -1 there and its other dimensions as
    inferred; the batch in any other constant cannot be kept dynamic."""
    theirs = {t.name: numpy_helper.to_array(t) for t in other.graph.initializer}
    shapes = {vi.name: _dims(vi) for vi in model.graph.value_info}
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    for tensor in model.graph.initializer:
        other_value = theirs.get(tensor.name)
        if tensor.name not in users or other_value is None:
            continue
        mine = numpy_helper.to_array(tensor)
        if mine.shape == other_value.shape and np.array_equal(mine, other_value):
            continue
        outs = {tuple(shapes.get(u.output[0], ())) for u in users[tensor.name]}
        differs = np.flatnonzero(mine != other_value) if mine.shape == other_value.shape else []
        target = list(outs.pop()) if len(outs) == 1 else []
        if not (all(u.op_type == "Reshape" and list(u.input).index(tensor.name) == 1 for u in users[tensor.name])
                and mine.ndim == 1 and len(differs) == 1 and len(target) == mine.size
                and all(isinstance(d, int) for d in target)
                and mine[differs[0]] * _OTHER_BATCH == other_value[differs[0]] * _FOLD_BATCH):
            node = users[tensor.name][0]
            raise UnsupportedModelError(
                f"the batch size takes part in the computation at node {node.name or node.output[0]} ({node.op_type}), "
                "where this tool cannot keep it dynamic; compute that step without the batch size (x.shape[0]) "
                "and re-export the model")
        target[differs[0]] = -1
        tensor.CopyFrom(numpy_helper.from_array(np.array(target, mine.dtype), tensor.name))


def _restore_dynamic_batch(model: onnx.ModelProto, io_names: set[str]) -> onnx.ModelProto:
    """Give Reshape targets folded at batch ``_FOLD_BATCH`` a -1 batch entry back."""
    consts = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Reshape" and node.input[1] in consts:
            target = numpy_helper.to_array(consts[node.input[1]])
            if target.size and target[0] == _FOLD_BATCH:
                target = target.copy()
                allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
                target[0] = 0 if -1 in target[1:] and not allowzero else -1  # 0: copy the input's batch
                consts[node.input[1]].CopyFrom(numpy_helper.from_array(target, node.input[1]))
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.name in io_names:
            dims = _dims(vi)
            if dims and dims[0] == _FOLD_BATCH:
                _set_dims(vi, ["N", *dims[1:]])
    del model.graph.value_info[:]
    return shape_inference.infer_shapes(model)


def normalize(model: onnx.ModelProto, input_hw: tuple[int, int] | None = None) -> onnx.ModelProto:
    """Return the normal form of ``model`` (a new ModelProto; the argument is not changed).

    ``input_hw`` fixes a dynamic height/width. The batch axis stays dynamic: folding runs at a fixed
    batch and Reshape targets are given their -1 back (where the graph reads the batch, a second fold
    at another batch shows which entries it went into); a fixed-batch export is checked against the
    file, and refused where the batch cannot be freed. ``check_dynamic_batch`` proves the result.
    """
    model = load_model(model)
    _check_ops(model)
    check_weights(model)
    inp = _image_input(model)
    opset = model_opset(model)
    if opset < INTERNAL_OPSET:
        model = _convert_opset(model)
    inp = _image_input(model)
    dims = _dims(inp)
    spatial = dims[1:]
    if any(not isinstance(d, int) or d <= 0 for d in spatial):
        c_axis = 1 if isinstance(dims[1], int) and dims[1] in (1, 3, 4) else 3
        if input_hw is None:
            kind = "dynamic" if any(not isinstance(d, int) for d in spatial) else "non-positive"
            raise UnsupportedModelError(
                f"input {inp.name} has {kind} height/width {dims}; fix them with --input-size H W")
        if any(not isinstance(v, int) or v < 1 for v in input_hw):
            raise BadInputError(f"--input-size needs two positive integers H W (got {list(input_hw)})")
        h, w = input_hw
        dims = [dims[0], dims[1], h, w] if c_axis == 1 else [dims[0], h, w, dims[3]]
    elif input_hw is not None:
        hw = dims[2:4] if isinstance(dims[1], int) and dims[1] in (1, 3, 4) else dims[1:3]
        if list(input_hw) != list(hw):
            raise BadInputError(f"--input-size {input_hw[0]} {input_hw[1]}, but input {inp.name} is fixed at "
                                f"{hw[0]}x{hw[1]}; drop --input-size (it fixes a dynamic height/width)")
    fixed_batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
    exported = load_model(model) if fixed_batch is not None else None  # the file as written, to compare with
    restore_batchnorm(model)  # before folding merges a BN's constants written as arithmetic
    # a dynamic batch that the graph reads (Shape) is folded at two sizes to see where it went
    reads_batch = fixed_batch is None and any(n.op_type in ("Shape", "Size") for n in model.graph.node)
    try:
        if fixed_batch is not None:  # fold at the exported batch first: Reshape targets that carry it become
            _set_dims(inp, dims)     # constants _unfix_batch can free
            model = _fold(model)
            inp = _image_input(model)
            _unfix_batch(model, fixed_batch)
        outputs = [o.name for o in model.graph.output]
        other = _fold(_at_batch(model, _OTHER_BATCH, dims, fixed_batch, weights=False)) if reads_batch else None
        model = _fold(_at_batch(model, _FOLD_BATCH, dims, fixed_batch))  # before any opset logic: inputs such as
                                                                         # ReduceMean-18's axes become constants
    except Exception as err:
        raise UnsupportedModelError(f"shape inference / constant folding failed ({str(err).splitlines()[0][:160]}); "
                                    "check the model with onnx.checker and re-export it") from None
    if reads_batch:
        _free_batch_dependent_targets(model, other)
    if opset > INTERNAL_OPSET:
        model = _downgrade_opset(model, opset)
    _pads_into_convs(model)
    model = _restore_dynamic_batch(model, {inp.name, *outputs})
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", INTERNAL_OPSET))
    model.ir_version = INTERNAL_IR
    image_io(model)   # refuses what the stages cannot take (output type, classes) before any work
    if fixed_batch is not None:
        _check_batch_is_free(exported, model, fixed_batch)
    return model


def image_io(model: onnx.ModelProto) -> ImageIO:
    """The image input (C, H, W after any leading NHWC→NCHW Transpose) and the logits output."""
    inp = _image_input(model)
    dims = _dims(inp)
    if len(model.graph.output) != 1:
        raise UnsupportedModelError(
            f"the model has {len(model.graph.output)} outputs; a classifier with one logits output is expected")
    out = model.graph.output[0]
    odims = _dims(out)
    if out.type.tensor_type.elem_type != onnx.TensorProto.FLOAT or len(odims) < 2:
        what = onnx.TensorProto.DataType.Name(out.type.tensor_type.elem_type)
        raise UnsupportedModelError(
            f"the output {out.name} is {what} of shape {odims}, not float32 logits [N, classes]; export the model "
            "without its post-processing (ArgMax, TopK, Cast), ending at the logits")
    classes = odims[1] if isinstance(odims[1], int) else -1
    if classes == 0 or any(isinstance(d, int) and d < 0 for d in odims[1:]):
        raise UnsupportedModelError(f"the output {out.name} has shape {odims}, with no classes; export the "
                                    "model with its classifier head")
    if any(d != 1 for d in odims[2:]):
        raise UnsupportedModelError(f"the output {out.name} has shape {odims}, not logits [N, classes]; export "
                                    "the model with its classifier head (a feature map has no top-1 class)")
    if not all(isinstance(d, int) and d > 0 for d in dims[1:]):
        raise UnsupportedModelError(f"input {inp.name} has dynamic height/width {dims}; fix them with --input-size H W")
    c, h, w = dims[1:]
    if nhwc_transpose(model) is not None:
        h, w, c = dims[1:]
    return ImageIO(inp.name, (int(c), int(h), int(w)), out.name, int(classes))


LAYOUT_KEEPING = ("QuantizeLinear", "DequantizeLinear", "Cast", "Identity")
LAYOUT_KEEPING_STEPS = 4


def nhwc_transpose(model: onnx.ModelProto, image: str | None = None) -> onnx.NodeProto | None:
    """The Transpose(0,3,1,2) that turns an NHWC input into NCHW, if the graph starts with one.
    ``image`` names the input where the graph has others (the swing offsets)."""
    name = image or _image_input(model).name
    users = [n for n in model.graph.node if name in n.input]
    for _ in range(LAYOUT_KEEPING_STEPS):  # a QDQ model quantizes the NHWC image before its Transpose;
        if len(users) == 1 and users[0].op_type in LAYOUT_KEEPING:  # Keras's torch backend casts it
            users = [n for n in model.graph.node if users[0].output[0] in n.input]
    if len(users) == 1 and users[0].op_type == "Transpose" and _perm(users[0]) == [0, 3, 1, 2]:
        return users[0]
    return None


def image_tensors(model: onnx.ModelProto) -> tuple[str, ...]:
    """The tensors that hold the image: the input and, for an NHWC model, its NCHW transpose."""
    to_nchw = nhwc_transpose(model)
    name = _image_input(model).name
    return (name,) if to_nchw is None else (name, to_nchw.output[0])


def to_input_layout(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """NCHW images as ``model`` takes them: an NHWC model (a leading Transpose) gets NHWC."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if nhwc_transpose(model) is not None else x


def check_dynamic_batch(original: onnx.ModelProto, normal: onnx.ModelProto, batches=(1, 3)) -> float:
    """Max |logit difference| between ``original`` and ``normal`` over a few batch sizes."""
    io = image_io(normal)
    inp = _image_input(normal)
    shape = _dims(inp)[1:]
    worst = 0.0
    s1, s2 = inference_session(original), inference_session(normal)
    rng = np.random.default_rng(0)
    for b in batches:
        x = rng.standard_normal((b, *shape)).astype(np.float32)
        a = s1.run(None, {s1.get_inputs()[0].name: x})[0]
        c = s2.run(None, {io.input: x})[0]
        worst = max(worst, float(np.abs(a - c).max()))
    return worst


_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
_LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def check_weights(model: onnx.ModelProto) -> None:
    """Refuse, naming the tensor, weights that would give a broken model without an error: NaN/Inf
    values (an infinite Clip bound means no bound and is kept), a negative BN variance, an empty or
    non-float32 layer weight."""
    graph = model.graph
    values = {t.name: t for t in graph.initializer}
    values.update({n.output[0]: n.attribute[0].t for n in graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    clip_bounds = {i for n in graph.node if n.op_type == "Clip" for i in n.input[1:]}
    for name, tensor in values.items():
        if tensor.data_type not in _FLOAT_TYPES:
            continue
        array = numpy_helper.to_array(tensor)
        bad = np.isnan(array) if name in clip_bounds else ~np.isfinite(array)
        if bad.any():
            raise UnsupportedModelError(
                f"weight tensor {name} holds {int(bad.sum())} NaN/Inf value(s) of {array.size}; the model is "
                "broken (a diverged training run?): re-export it from a checkpoint with finite weights")
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            if not np.isfinite(eps) or eps < 0:
                raise UnsupportedModelError(f"BN layer {node.name} has epsilon {eps}; re-export the model with a "
                                            "finite epsilon >= 0 (PyTorch's is 1e-5)")
        if node.op_type == "BatchNormalization" and len(node.input) > 4 and node.input[4] in values:
            var = numpy_helper.to_array(values[node.input[4]])
            if (var < 0).any():
                raise UnsupportedModelError(
                    f"BN layer {node.name} has a negative running variance in {node.input[4]} (min {var.min():g}); "
                    "a variance cannot be negative, so the model is broken: re-export it from a sound checkpoint")
            if (var + eps <= 0).any():
                raise UnsupportedModelError(
                    f"BN layer {node.name} divides by zero: running variance 0 in {node.input[4]} and epsilon 0; "
                    "re-export the model with epsilon > 0 (PyTorch's is 1e-5)")
        if node.op_type in _LAYERS and len(node.input) > 1 and node.input[1] in values:
            weight = values[node.input[1]]
            if weight.data_type != onnx.TensorProto.FLOAT:
                raise UnsupportedModelError(
                    f"the weights {weight.name or node.input[1]} of {node.name} are "
                    f"{onnx.TensorProto.DataType.Name(weight.data_type)}; export the model in float32 "
                    "(in PyTorch: model.float() before exporting)")
            if 0 in weight.dims:
                raise UnsupportedModelError(
                    f"the weights {node.input[1]} of {node.name} have shape {list(weight.dims)}, an empty layer; "
                    "re-export the model without it")
