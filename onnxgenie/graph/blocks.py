"""Reconstruction blocks: the BN-folded graph cut at single tensors (BRECQ's block granularity).

A tensor is a *cut* when it is the only value alive between the nodes before it and the nodes after
it (in topological order): every path from the input to the output passes through it. Residual
blocks of ResNets and ShuffleNet units have no cut inside (the shortcut is alive), so each of them
becomes one segment; a plain chain is cut after every op, which gives single-layer blocks.
Each block holds exactly one segment with quantized layers; segments without any (ReLU, pooling,
flatten) join their neighbour: element-wise epilogues the block before, everything else the next.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx
from onnx import shape_inference

from ..builder import make_model, value_infos

QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")
EPILOGUE_OPS = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "PRelu",
                "Identity", "Mul", "Add"}


@dataclass
class Block:
    name: str
    nodes: list[str]                 # node names, topological order
    input: str                       # the cut tensor feeding the block
    output: str                      # the cut tensor it produces
    quantized_nodes: list[str] = field(default_factory=list)


def quantizable_nodes(model: onnx.ModelProto) -> list[str]:
    """Conv/Gemm/MatMul nodes whose weight (second input) is an initializer."""
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type in QUANTIZED_OPS and len(n.input) > 1 and n.input[1] in inits]


def cut_points(model: onnx.ModelProto) -> list[tuple[int, str]]:
    """(index of the producing node, tensor) for every single-tensor cut; the input has index -1."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    nodes = list(graph.node)
    inputs = [i.name for i in graph.input if i.name not in inits]
    outputs = {o.name for o in graph.output}
    last_use: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for t in node.input:
            if t and t not in inits:
                last_use[t] = i
    for t in outputs:
        last_use[t] = len(nodes)
    live = {t for t in inputs if t in last_use}
    cuts = [(-1, inputs[0])] if len(inputs) == 1 else []
    for i, node in enumerate(nodes):
        live |= {o for o in node.output if o}
        live = {t for t in live if last_use.get(t, -1) > i}
        if len(live) == 1:
            cuts.append((i, next(iter(live))))
    return cuts


def partition_blocks(folded: onnx.ModelProto, quantized: list[str] | None = None) -> list[Block]:
    """Split ``folded`` into blocks; every node in ``quantized`` (default: all quantizable) in one block."""
    quantized = set(quantizable_nodes(folded) if quantized is None else quantized)
    nodes = list(folded.graph.node)
    cuts = cut_points(folded)
    segments = []  # (input tensor, output tensor, nodes)
    for (start, t_in), (end, t_out) in zip(cuts, cuts[1:]):
        if end > start:
            segments.append((t_in, t_out, nodes[start + 1:end + 1]))
    blocks: list[Block] = []
    pending: list = []  # segments waiting for the next quantized segment
    for t_in, t_out, seg in segments:
        has_quant = any(n.name in quantized for n in seg)
        if has_quant:
            first_in = pending[0][0] if pending else t_in
            seg_nodes = [n for p in pending for n in p[2]] + seg
            pending = []
            blocks.append(Block(f"block_{len(blocks):03d}", [n.name for n in seg_nodes], first_in, t_out,
                                [n.name for n in seg_nodes if n.name in quantized]))
        elif blocks and not pending and all(n.op_type in EPILOGUE_OPS for n in seg):
            blocks[-1].nodes.extend(n.name for n in seg)
            blocks[-1].output = t_out
        else:
            pending.append((t_in, t_out, seg))
    if pending and blocks:
        for _, t_out, seg in pending:
            blocks[-1].nodes.extend(n.name for n in seg)
            blocks[-1].output = t_out
    covered = {n for b in blocks for n in b.quantized_nodes}
    missing = quantized - covered
    if missing:  # a quantized node outside the input→output spine (not expected for classifiers)
        raise ValueError(f"quantized nodes outside every block: {sorted(missing)[:5]}")
    return blocks


def extract_block_model(folded: onnx.ModelProto, block: Block) -> onnx.ModelProto:
    """The block as a standalone model: input ``block.input``, output ``block.output``."""
    wanted = set(block.nodes)
    nodes = [n for n in folded.graph.node if n.name in wanted]
    produced = {o for n in nodes for o in n.output}
    used = {i for n in nodes for i in n.input if i}
    inits = [t for t in folded.graph.initializer if t.name in used]
    init_names = {t.name for t in inits}
    outside = used - produced - init_names - {block.input}
    if outside:
        raise ValueError(f"{block.name} reads tensors produced outside it: {sorted(outside)[:3]}")
    vis = value_infos(folded)
    if block.input not in vis or block.output not in vis:
        folded = shape_inference.infer_shapes(folded)
        vis = value_infos(folded)
    inner = [vis[t] for t in produced - {block.output} if t in vis]
    return make_model(nodes, block.name, [vis[block.input]], [vis[block.output]], inits, folded, value_info=inner)


def format_blocks(folded: onnx.ModelProto, blocks: list[Block]) -> str:
    """One line per block, for ``onnxgenie inspect --blocks``."""
    ops = {n.name: n.op_type for n in folded.graph.node}
    lines = [f"{len(blocks)} reconstruction blocks"]
    for b in blocks:
        lines.append(f"  {b.name}  {len(b.quantized_nodes)} quantized / {len(b.nodes)} nodes  "
                     f"({' '.join(ops[n] for n in b.nodes)})  {b.input} -> {b.output}")
    return "\n".join(lines)


def blocks_json(blocks: list[Block]) -> list[dict]:
    return [{"name": b.name, "input": b.input, "output": b.output, "nodes": b.nodes,
             "quantized_nodes": b.quantized_nodes} for b in blocks]
