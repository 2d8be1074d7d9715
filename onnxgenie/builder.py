"""The one way this package writes ONNX: a builder for new nodes and initializers, and the small edits
every graph rewrite needs (attributes, rewiring, placement, a model around the result). It sits below
every other layer (the engine's graph forms use it), so it imports nothing of the package.

    b = GraphBuilder("bns.")
    var = b.op("ReduceMean", b.op("Mul", d, d), axes=[0, 2, 3], keepdims=0)
    b.const(np.float32(1e-6), "bns.std_eps")

Names: ``out``/``name`` when given; otherwise ``fresh(hint)`` = prefix + hint + sep + a counter.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper


class GraphBuilder:
    """Nodes and initializers appended to a graph under construction."""

    def __init__(self, prefix: str = "", sep: str = "_"):
        self.prefix, self.sep = prefix, sep
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0
        self._values: dict[str, np.ndarray] = {}

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}{self.sep}{self._count}"

    def const(self, value, name: str | None = None, dtype=None) -> str:
        """An initializer holding ``value``: float32, int64 for integers, unless ``dtype`` says otherwise.
        A name given twice with the same value is one initializer."""
        value = np.asarray(value)
        if dtype is None:
            dtype = np.int64 if np.issubdtype(value.dtype, np.integer) else np.float32
        value = value.astype(dtype)
        if name in self._values:
            if not np.array_equal(self._values[name], value):
                raise ValueError(f"initializer {name} defined twice with different values")
            return name
        name = name or self.fresh("const")
        self._values[name] = value
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def tensor(self, proto: onnx.TensorProto) -> str:
        """An initializer made elsewhere (packed 4-bit integers)."""
        self.inits.append(proto)
        return proto.name

    def op(self, op_type: str, *inputs: str, out: str | None = None, name: str | None = None,
           domain: str | None = None, **attrs) -> str:
        """Append one node; returns its (single) output."""
        out = out or self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name or out, domain=domain, **attrs))
        return out

    def take(self) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        """The nodes and initializers added since the last call (for rewrites that place them piece by piece)."""
        nodes, inits, self.nodes, self.inits = self.nodes, self.inits, [], []
        return nodes, inits


def attr(node: onnx.NodeProto, name: str, default=None):
    """The value of ``node``'s attribute ``name`` (``default`` when absent)."""
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def rewire(nodes: Iterable[onnx.NodeProto], old: str, new: str, only: Iterable[str] | None = None) -> None:
    """Make ``nodes`` (those named in ``only``, when given) read ``new`` instead of ``old``."""
    wanted = None if only is None else set(only)
    for node in nodes:
        if wanted is None or node.name in wanted:
            node.input[:] = [new if i == old else i for i in node.input]


def insert_after_producer(model: onnx.ModelProto, tensor: str, nodes: list[onnx.NodeProto]) -> None:
    """Insert ``nodes`` right after the node producing ``tensor`` (first for a graph input): a
    topologically sorted graph stays sorted."""
    position = next((i + 1 for i, node in enumerate(model.graph.node) if tensor in node.output), 0)
    insert_nodes(model, position, nodes)


def insert_nodes(model: onnx.ModelProto, position: int, nodes: list[onnx.NodeProto]) -> None:
    for offset, node in enumerate(nodes):
        model.graph.node.insert(position + offset, node)


def replace_initializers(model: onnx.ModelProto, new: list[onnx.TensorProto], drop: Iterable[str] = ()) -> None:
    """Remove the initializers named in ``new`` or ``drop``, then append ``new``."""
    gone = {t.name for t in new} | set(drop)
    keep = [t for t in model.graph.initializer if t.name not in gone]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + list(new))


def value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """The declared type of every tensor that has one (value_info, then inputs, then outputs: the first wins)."""
    g = model.graph
    found: dict[str, onnx.ValueInfoProto] = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        found.setdefault(vi.name, vi)
    return found


def make_model(nodes: list[onnx.NodeProto], name: str, inputs: list[onnx.ValueInfoProto],
               outputs: list[onnx.ValueInfoProto], inits: list[onnx.TensorProto], like: onnx.ModelProto,
               producer_name: str = "", value_info: list[onnx.ValueInfoProto] = ()) -> onnx.ModelProto:
    """A model of these parts with ``like``'s opsets and IR version."""
    graph = helper.make_graph(nodes, name, inputs, outputs, inits, value_info=list(value_info))
    extra = {"producer_name": producer_name} if producer_name else {}
    model = helper.make_model(graph, opset_imports=list(like.opset_import), **extra)
    model.ir_version = like.ir_version
    return model
