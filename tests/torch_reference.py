"""The same ResNets in plain torch.nn: the reference for the parity tests and the peer in
bench/step.py. Names match torchvision's, so our state_dict() loads with strict=True.
Needs torch (the test extra); the engine itself never imports this module.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from engine.model import ARCHS


class Block(nn.Module):
    def __init__(self, kind, cin, planes, stride):
        super().__init__()
        if kind == "basic":
            cout, convs = planes, [(cin, planes, 3, stride, 1), (planes, planes, 3, 1, 1)]
        else:
            cout = planes * 4
            convs = [(cin, planes, 1, 1, 0), (planes, planes, 3, stride, 1), (planes, cout, 1, 1, 0)]
        self.depth = len(convs)
        for i, (ci, co, k, s, p) in enumerate(convs, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(ci, co, k, s, p, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(co))
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.cout = cout

    def forward(self, x):
        r = x
        for i in range(1, self.depth + 1):
            r = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(r))
            if i < self.depth:
                r = F.relu(r)
        return F.relu(r + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(nn.Module):
    def __init__(self, arch, num_classes):
        super().__init__()
        kind, counts = ARCHS[arch]
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        cin = 64
        for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), counts), start=1):
            blocks = []
            for i in range(count):
                blocks.append(Block(kind, cin, planes, 2 if stage > 1 and i == 0 else 1))
                cin = blocks[-1].cout
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for stage in range(1, 5):
            x = getattr(self, f"layer{stage}")(x)
        return self.fc(x.mean(dim=(2, 3)))


def torch_twin(model, dtype=torch.float32) -> TorchResNet:
    """A torch network with `model`'s weights and eval statistics (strict load)."""
    net = TorchResNet(model.arch, model.num_classes).to(dtype)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()}, strict=True)
    return net
