"""Rebuild tests/data's PyTorch exports (see README.md). Needs torch and torchvision."""
from pathlib import Path

import torch
import torchvision

HERE = Path(__file__).parent


def _stats_then_eval(model: torch.nn.Module, size: int) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(20):
            model(torch.randn(8, 3, size, size))
    return model.eval()


def _export(model: torch.nn.Module, size: int, name: str) -> None:
    torch.onnx.export(model, torch.randn(2, 3, size, size), str(HERE / name), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, do_constant_folding=False,
                      training=torch.onnx.TrainingMode.EVAL)


def shuffle(x, groups=2):
    n, c, h, w = x.size()
    return torch.transpose(x.view(n, groups, c // groups, h, w), 1, 2).contiguous().view(n, c, h, w)


class ShuffleStrided(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
        self.c2, self.b2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        x = shuffle(shuffle(torch.relu(self.b1(self.c1(x)))) * 1.0)
        return self.fc(torch.relu(self.b2(self.c2(x))).mean((2, 3)))


if __name__ == "__main__":
    torch.manual_seed(0)
    _export(_stats_then_eval(ShuffleStrided(), 16), 16, "shuffle_strided.onnx")
    torch.manual_seed(0)
    dense = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                                        num_classes=10)
    _export(_stats_then_eval(dense, 64), 64, "tiny_densenet_2_2_64.onnx")
