"""Reference models that manifold-nets was not written for, in plain torch.

They are what users bring: a ResNet with torchvision's BasicBlock layout (residual blocks,
downsampling with a 1x1 conv and batch norm), a pre-LN transformer (token and position
embeddings, multi-head attention, a ReLU MLP, a final layer norm) and a residual MLP with
biases everywhere. The symmetry analysis, the examples and the tests try the library on
them; ``manifold-nets discover manifold_nets.experiments.zoo:resnet18`` does too.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "PreLNBlock", "PreLNTransformer", "ResNet", "ResidualMLP",
           "gpt2_block", "pre_ln_transformer", "residual_mlp", "resnet18", "small_resnet"]


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 conv-BN, ReLU between, a residual connection
    (through a 1x1 conv and batch norm where the shape changes), ReLU after the sum."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """torchvision's ResNet layout with BasicBlocks: a 7x7 stride-2 stem conv, batch norm,
    ReLU and 3x3 stride-2 max-pooling, four stages, global average pooling, a linear
    classifier with a bias."""

    def __init__(self, blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512), num_classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, c = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths, strict=True)):
            layer = []
            for j in range(n):
                layer.append(BasicBlock(c, w, 2 if j == 0 and i > 0 else 1))
                c = w
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = (stages + [nn.Identity()] * 4)[:4]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 10) -> ResNet:
    """ResNet-18 (11.2 M parameters with 10 classes)."""
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes)


def small_resnet(num_classes: int = 10) -> ResNet:
    """A ResNet with the same layout and widths 8, 16 (one block per stage)."""
    return ResNet((1, 1), (8, 16), num_classes)


class PreLNBlock(nn.Module):
    """``x + attn(ln1(x))``, then ``x + fc2(act(fc1(ln2(x))))``."""

    def __init__(self, d: int, heads: int, mlp: int, activation: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, mlp)
        self.act = activation()
        self.fc2 = nn.Linear(mlp, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class PreLNTransformer(nn.Module):
    """Token and position embeddings, pre-LN blocks, a final layer norm, a linear head
    (per-token logits)."""

    def __init__(self, vocab: int = 100, d: int = 32, heads: int = 4, mlp: int = 64,
                 layers: int = 2, context: int = 16, out: int | None = None,
                 activation: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(PreLNBlock(d, heads, mlp, activation)
                                    for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, out or vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok(tokens) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def pre_ln_transformer(**kwargs) -> PreLNTransformer:
    """A small pre-LN transformer (see :class:`PreLNTransformer` for the options)."""
    return PreLNTransformer(**kwargs)


def gpt2_block(d: int = 768, heads: int = 12, mlp: int = 3072) -> nn.Module:
    """One GPT-2-small-sized pre-LN block on embeddings ``(N, T, d)``, with a final layer
    norm."""
    return nn.Sequential(PreLNBlock(d, heads, mlp), nn.LayerNorm(d))


class ResidualMLP(nn.Module):
    """``x = inp(x)``, then blocks ``x + fc2(relu(fc1(x)))``, then ``head(relu(x))``;
    biases everywhere."""

    def __init__(self, d_in: int = 5, d: int = 8, hidden: int = 16, blocks: int = 2,
                 out: int = 3):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.ReLU(),
                                                  nn.Linear(hidden, d))
                                    for _ in range(blocks))
        self.head = nn.Linear(d, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(torch.relu(x))


def residual_mlp(**kwargs) -> ResidualMLP:
    """A residual MLP (see :class:`ResidualMLP` for the options)."""
    return ResidualMLP(**kwargs)
