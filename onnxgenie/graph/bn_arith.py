"""BatchNormalization written out as arithmetic, put back as a BatchNormalization node.

Keras 3 (and hand-written inference code) spells an eval-mode BN as elementwise ops on constants:
``(x - mean) * rsqrt(var + eps) * gamma + beta``, ``x * a + (beta - mean * a)`` with
``a = gamma / sqrt(var + eps)``, divisions for reciprocals, the channels on the last axis (NHWC).
Every chain of Add/Sub/Mul/Div ops that each take one constant operand is tried against the formula:
the chain's constant leaves (initializers, Constant nodes) are given the roles mean, var, gamma, beta
and eps, and an assignment under which the chain computes the formula for random inputs and random
leaf values makes the chain that BN, exactly; it is replaced by a BatchNormalization node holding the
leaves' own values. This runs before constant folding, which would merge the leaves into one scale
and one shift and lose the statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference
from onnx.reference import ReferenceEvaluator

from ..builder import GraphBuilder

AFFINE_OPS = ("Add", "Sub", "Mul", "Div")
ROOT_OPS = ("Sqrt", "Pow")      # a BN's constants take a square root of var + eps
RANDOM_OPS = ("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli", "Multinomial")
MAX_STATISTICS = 4              # mean, var, gamma, beta: a chain with more per-channel constants is not one BN
ROLES = ("mean", "var", "gamma", "beta", "eps")


@dataclass
class _Chain:
    nodes: list[onnx.NodeProto]   # in order, each node's variable input the previous one's output
    x: str                        # the variable input of the first


def _is_constant_node(node: onnx.NodeProto, consts: set[str]) -> bool:
    if node.op_type == "Constant":
        return True
    inputs = [i for i in node.input if i]
    return bool(inputs) and node.op_type not in RANDOM_OPS and all(i in consts for i in inputs) and not any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _constants(model: onnx.ModelProto) -> tuple[set[str], dict[str, onnx.NodeProto]]:
    """Names computable without the image (initializers, Constants and what only they feed), and the
    nodes computing them."""
    consts = {t.name for t in model.graph.initializer}
    producers = {}
    for node in model.graph.node:   # an ONNX graph is topologically sorted
        if _is_constant_node(node, consts):
            consts.update(node.output)
            producers.update({o: node for o in node.output})
    return consts, producers


def _variable_input(node: onnx.NodeProto, consts: set[str]) -> str | None:
    """The one non-constant input of an affine op (x in x+c, c-x, x*c, x/c), else None."""
    if node.op_type not in AFFINE_OPS or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    variable = [i for i in node.input if i not in consts]
    if len(variable) != 1 or (node.op_type == "Div" and node.input[0] != variable[0]):
        return None
    return variable[0]


def _chains(model: onnx.ModelProto, consts: set[str]) -> list[_Chain]:
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for i in node.input:
            uses[i] = uses.get(i, 0) + 1
    for out in model.graph.output:
        uses[out.name] = uses.get(out.name, 0) + 1
    links = {n.output[0]: (n, x) for n in model.graph.node if (x := _variable_input(n, consts)) is not None}
    follows = {x: n for n, x in links.values() if x in links and uses[x] == 1}   # x -> the link it feeds alone
    chains = []
    for node, x in links.values():
        if x in follows and follows[x] is node:
            continue   # not a chain's first link
        chain = _Chain([node], x)
        while chain.nodes[-1].output[0] in follows:
            chain.nodes.append(follows[chain.nodes[-1].output[0]])
        chains.append(chain)
    return chains


def _const_value(node: onnx.NodeProto) -> np.ndarray | None:
    attr = node.attribute[0] if len(node.attribute) == 1 else None
    if attr is None:
        return None
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    if attr.name in ("value_float", "value_floats"):
        return np.array(helper.get_attribute_value(attr), np.float32)
    if attr.name in ("value_int", "value_ints"):
        return np.array(helper.get_attribute_value(attr), np.int64)
    return None


class _Probe:
    """The chain and the constant ops it reads, as a small model run by onnx's reference evaluator; its
    inputs are the chain's input and each read of a float leaf (an exporter may store equal constants,
    a fresh layer's zero mean and beta, once and read that tensor for both)."""

    def __init__(self, model: onnx.ModelProto, chain: _Chain, producers: dict[str, onnx.NodeProto],
                 inits: dict[str, onnx.TensorProto]):
        inner = {n.output[0] for n in chain.nodes}

        def is_leaf(name: str) -> bool:
            return name in inits or producers[name].op_type == "Constant"

        ancestors: dict[str, onnx.NodeProto] = {}   # by first output
        todo = [i for n in chain.nodes for i in n.input if i != chain.x and i not in inner]
        while todo:
            name = todo.pop()
            node = producers.get(name)
            if not is_leaf(name) and node.output[0] not in ancestors:   # computed from other constants
                ancestors[node.output[0]] = node
                todo.extend(i for i in node.input if i)
        order = {n.output[0]: k for k, n in enumerate(model.graph.node)}
        self.leaves: dict[str, np.ndarray] = {}    # float constants, one per read: the candidates for the roles
        fixed: dict[str, onnx.TensorProto] = {}    # the others (Reshape targets, axes)
        self.nodes = []
        for node in sorted(ancestors.values(), key=lambda n: order[n.output[0]]) + chain.nodes:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            for k, name in enumerate(node.input):
                if not name or name == chain.x or name in inner or not is_leaf(name):
                    continue
                array = numpy_helper.to_array(inits[name]) if name in inits else _const_value(producers[name])
                if array is None:
                    raise ValueError(f"unreadable Constant {name}")
                if array.dtype.kind == "f":
                    copy.input[k] = f"{name}#{len(self.leaves)}"
                    self.leaves[copy.input[k]] = array
                else:
                    fixed[name] = numpy_helper.from_array(array, name)
            self.nodes.append(copy)
        made = {o: n for n in self.nodes for o in n.output}
        self.has_root = any(n.op_type in ROOT_OPS for n in self.nodes)
        self.under_root = set()   # the leaves inside a square root: where var and eps must be
        todo = [i for n in self.nodes if n.op_type in ROOT_OPS for i in n.input]
        while todo:
            name = todo.pop()
            if name in self.leaves:
                self.under_root.add(name)
            elif name in made:
                todo.extend(i for i in made[name].input if i)
        self.fixed, self.x, self.output, self.model = list(fixed.values()), chain.x, chain.nodes[-1].output[0], model
        self._session = None

    def run(self, x: np.ndarray, leaves: dict[str, np.ndarray]) -> np.ndarray:
        if self._session is None:
            elem = onnx.TensorProto.FLOAT
            inputs = [helper.make_tensor_value_info(self.x, elem, None)] + [
                helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), None)
                for n, a in self.leaves.items()]
            graph = helper.make_graph(self.nodes, "bn_probe", inputs,
                                      [helper.make_tensor_value_info(self.output, elem, None)], self.fixed)
            probe = helper.make_model(graph, opset_imports=list(self.model.opset_import))
            probe.ir_version = self.model.ir_version
            self._session = ReferenceEvaluator(probe)
        return np.asarray(self._session.run(None, {self.x: x, **leaves})[0])


def _formula(x, mean, var, gamma, beta, eps, shape) -> np.ndarray:
    def per_channel(v, default):
        return np.float32(default) if v is None else v.reshape(shape).astype(np.float32)

    inv = 1 / np.sqrt(per_channel(var, 0) + np.float32(0 if eps is None else eps.item()))
    return (x - per_channel(mean, 0)) * inv * per_channel(gamma, 1) + per_channel(beta, 0)


def _assignments(vectors: list[str], scalars: list[str], under_root: set[str]):
    """(mean, var, gamma, beta, eps) with every per-channel leaf used, var and eps inside the square
    root; None: absent (gamma 1, beta 0, eps 0)."""
    for var in (v for v in vectors if v in under_root):
        for mean in (v for v in vectors if v != var):
            rest = [v for v in vectors if v not in (mean, var)]
            pairs = [(None, None)] if not rest else [(*rest, None), (None, *rest)] if len(rest) == 1 else [
                tuple(rest), tuple(reversed(rest))]
            for gamma, beta in pairs:
                for eps in [*(s for s in scalars if s in under_root), None]:
                    yield dict(zip(ROLES, (mean, var, gamma, beta, eps)))


def _match(probe: _Probe, rank: int, rng: np.random.Generator) -> tuple[int, dict[str, np.ndarray | None]] | None:
    """(channel axis, role -> actual value) when the chain is a BN, else None."""
    base = probe.run(np.zeros([1] * rank, np.float32), probe.leaves)
    if base.ndim != rank or base.dtype != np.float32:
        return None
    wide = [a for a, d in enumerate(base.shape) if d != 1]
    if len(wide) != 1 or wide[0] == 0:
        return None
    axis, channels = wide[0], base.shape[wide[0]]
    vectors = [n for n, v in probe.leaves.items() if v.size == channels]
    scalars = [n for n, v in probe.leaves.items() if v.size == 1]
    if not 2 <= len(vectors) <= MAX_STATISTICS:
        return None
    shape = [1] * rank
    shape[axis] = channels
    x_shape = list(shape)
    x_shape[0] = 2
    x = rng.standard_normal(x_shape).astype(np.float32)
    draws = {"mean": rng.standard_normal(channels), "var": rng.uniform(0.5, 2.0, channels),
             "gamma": rng.standard_normal(channels), "beta": rng.standard_normal(channels),
             "eps": rng.uniform(0.01, 0.1, 1)}
    for roles in _assignments(vectors, scalars, probe.under_root):
        leaves = dict(probe.leaves)
        for role, name in roles.items():
            if name is not None:
                leaves[name] = draws[role].reshape(probe.leaves[name].shape).astype(probe.leaves[name].dtype)
        drawn = {r: None if n is None else leaves[n] for r, n in roles.items()}
        try:
            if not np.allclose(probe.run(x, leaves), _formula(x, **drawn, shape=shape), rtol=1e-4, atol=1e-5):
                continue
        except Exception:   # a leaf whose shape the random value breaks, or one that must stay as it is
            continue
        actual = {r: None if n is None else probe.leaves[n].astype(np.float32) for r, n in roles.items()}
        var = actual["var"].reshape(-1) + (0 if actual["eps"] is None else actual["eps"].item())
        if not (np.all(np.isfinite(var)) and np.all(var > 0)):
            return None
        want = _formula(x, **actual, shape=shape)
        if np.allclose(probe.run(x, probe.leaves), want, rtol=1e-4, atol=1e-5):
            return axis, actual
        return None
    return None


def _bn_nodes(model: onnx.ModelProto, chain: _Chain, axis: int, rank: int, roles: dict) -> list[onnx.NodeProto]:
    y = chain.nodes[-1].output[0]
    name = chain.nodes[-1].name or y
    channels = roles["mean"].size
    values = {"scale": roles["gamma"], "B": roles["beta"], "mean": roles["mean"], "var": roles["var"]}
    defaults = {"scale": np.ones(channels, np.float32), "B": np.zeros(channels, np.float32)}
    b = GraphBuilder()
    inputs = [b.const(defaults[key] if value is None else value.reshape(-1).astype(np.float32), f"{name}.bn_{key}")
              for key, value in values.items()]
    model.graph.initializer.extend(b.inits)
    eps = 0.0 if roles["eps"] is None else float(roles["eps"].item())
    if axis == 1:
        b.op("BatchNormalization", chain.x, *inputs, out=y, name=name, epsilon=eps)
        return b.nodes
    perm = [0, axis, *(a for a in range(1, rank) if a != axis)]
    back = [int(a) for a in np.argsort(perm)]
    channels_first = b.op("Transpose", chain.x, out=f"{y}.channels_first", name=f"{name}.to_bn", perm=perm)
    normed = b.op("BatchNormalization", channels_first, *inputs, out=f"{y}.bn", name=name, epsilon=eps)
    b.op("Transpose", normed, out=y, name=f"{name}.from_bn", perm=back)
    return b.nodes


def _find(model, chain, producers, inits, ranks, rng) -> list[tuple[_Chain, int, dict]]:
    """The BN layers among the chain's sub-chains, longest first."""
    n = len(chain.nodes)
    for length in range(n, 1, -1):
        for start in range(n - length + 1):
            nodes = chain.nodes[start:start + length]
            sub = _Chain(nodes, chain.x if start == 0 else chain.nodes[start - 1].output[0])
            rank = ranks.get(sub.x)
            if rank is None or rank < 2:
                continue
            try:
                probe = _Probe(model, sub, producers, inits)
                found = probe.has_root and _match(probe, rank, rng)
            except Exception:   # an op the reference evaluator lacks, a shape it cannot broadcast: not BN
                found = None
            if found:
                before = _Chain(chain.nodes[:start], chain.x)
                after = _Chain(chain.nodes[start + length:], nodes[-1].output[0])
                return ([(sub, *found)] + _find(model, before, producers, inits, ranks, rng)
                        + _find(model, after, producers, inits, ranks, rng))
    return []


def restore_batchnorm(model: onnx.ModelProto) -> int:
    """Replace, in place, each chain of constant arithmetic that computes an eval-mode BN by a
    BatchNormalization node (channels moved to axis 1 and back around it where they are elsewhere).
    Returns how many; the graph is unchanged where none is found."""
    consts, producers = _constants(model)
    chains = [c for c in _chains(model, consts) if len(c.nodes) >= 2]
    if not chains:
        return 0
    inferred = shape_inference.infer_shapes(model)
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
             if vi.type.tensor_type.HasField("shape")}
    inits = {t.name: t for t in model.graph.initializer}
    rng = np.random.default_rng(0)
    found = [m for c in chains for m in _find(model, c, producers, inits, ranks, rng)]
    if not found:
        return 0
    replaced = {n.output[0]: (chain, axis, roles) for chain, axis, roles in found for n in chain.nodes}
    nodes = []
    for node in model.graph.node:
        if node.output[0] not in replaced:
            nodes.append(node)
            continue
        chain, axis, roles = replaced[node.output[0]]
        if node.output[0] == chain.nodes[-1].output[0]:   # where the chain's output is made: its input exists
            nodes.extend(_bn_nodes(model, chain, axis, ranks[chain.x], roles))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return len(found)
