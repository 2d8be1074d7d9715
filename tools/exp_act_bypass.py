"""Which activation quantizer costs accuracy: take one Q/DQ pair at a time out of an exported model.

For each activation QuantizeLinear → DequantizeLinear pair of a QDQ model written by `onnxgenie
quantize`, its readers get the float tensor instead; the model is scored on the first dev images and
the change against the full model is printed, largest first. Weights stay quantized. After GENIE-M a
negative change means the reconstruction has fitted the following layers to that quantizer.

    .venv/bin/python tools/exp_act_bypass.py out/shufflenet_w4a4.onnx shufflenet_g3_cifar10 --dev-images 2000
"""

from __future__ import annotations

import argparse
import sys

import onnx

from benchlib import ROOT, dev_split

sys.path.insert(0, str(ROOT))

from onnxgenie.evaluate import predict  # noqa: E402


def without_pair(model: onnx.ModelProto, quant: onnx.NodeProto) -> onnx.ModelProto:
    """``model`` with the activation quantizer ``quant`` and its DequantizeLinear removed."""
    out = onnx.ModelProto.FromString(model.SerializeToString())
    (dequant,) = [n for n in out.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == quant.output[0]]
    kept = [n for n in out.graph.node if n.output[0] not in (quant.output[0], dequant.output[0])]
    for node in kept:
        for i, name in enumerate(node.input):
            if name == dequant.output[0]:
                node.input[i] = quant.input[0]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("qdq", help="a QDQ model written by `onnxgenie quantize`")
    parser.add_argument("model", help="the shared model it was made from, without .onnx (for preprocessing)")
    parser.add_argument("--dev-images", type=int, default=2000)
    args = parser.parse_args()
    x, y = dev_split(args.model, args.dev_images)

    def top1(m: onnx.ModelProto) -> float:
        return 100 * float((predict(m, x).argmax(1) == y).mean())

    qdq = onnx.load(args.qdq)
    base = top1(qdq)
    print(f"all quantizers: {base:.2f}", flush=True)
    weights = {t.name for t in qdq.graph.initializer}
    rows = [(top1(without_pair(qdq, q)) - base, q.input[0]) for q in qdq.graph.node
            if q.op_type == "QuantizeLinear" and q.input[0] not in weights]
    for change, tensor in sorted(rows, reverse=True):
        print(f"{change:+6.2f}  {tensor}")


if __name__ == "__main__":
    main()
