"""Reference models that manifold-nets was not written for, in plain torch.

They are what users bring: a ResNet with torchvision's BasicBlock layout (residual blocks,
downsampling with a 1x1 conv and batch norm), a pre-LN transformer (token and position
embeddings, multi-head attention, a ReLU MLP, a final layer norm), a ViT on the same
blocks (patch embedding, GELU MLPs, mean pooling) and a residual MLP with biases
everywhere. The symmetry analysis, the examples and the tests try the library on
them; ``manifold-nets discover manifold_nets.experiments.zoo:resnet18`` does too.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "PreLNBlock", "PreLNTransformer", "ResNet", "ResidualMLP",
           "VisionTransformer", "gpt2_block", "pre_ln_transformer", "residual_mlp", "resnet18",
           "small_resnet"]


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 conv-BN, ReLU between, a residual connection
    (through a 1x1 conv and batch norm where the shape changes), ReLU after the sum.

    Parameters
    ----------
    cin : int
        Input channels.
    cout : int
        Output channels.
    stride : int
        Stride of the first conv (and of the shortcut's 1x1 conv).

    Attributes
    ----------
    conv1, bn1, conv2, bn2 : torch.nn.Module
        The two conv-BN pairs (the convs have no bias).
    downsample : torch.nn.Sequential or None
        The 1x1 conv and batch norm of the shortcut, where ``stride != 1`` or
        ``cin != cout``; ``None`` for the identity.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.experiments.zoo import BasicBlock
    >>> block = BasicBlock(4, 8, stride=2)
    >>> tuple(block(torch.randn(2, 4, 8, 8)).shape), block.downsample is not None
    ((2, 8, 4, 4), True)
    """

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
        """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

        Parameters
        ----------
        x : torch.Tensor
            ``(N, cin, H, W)``.

        Returns
        -------
        torch.Tensor
            ``(N, cout, H / stride, W / stride)`` (rounded up), non-negative.

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.experiments.zoo import BasicBlock
        >>> y = BasicBlock(4, 4)(torch.randn(2, 4, 6, 6))
        >>> tuple(y.shape), bool((y >= 0).all())
        ((2, 4, 6, 6), True)
        """
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """torchvision's ResNet layout with BasicBlocks: a 7x7 stride-2 stem conv, batch norm,
    ReLU and 3x3 stride-2 max-pooling, four stages, global average pooling, a linear
    classifier with a bias.

    Parameters
    ----------
    blocks : sequence of int
        :class:`BasicBlock` per stage (at most four stages; missing ones are identities).
    widths : sequence of int
        Channels of each stage (as many as ``blocks``); the stem has ``widths[0]``. Every
        stage after the first starts with a stride-2 block.
    num_classes : int
        Outputs of the classifier ``fc``.
    in_channels : int
        Channels of the input images.

    Raises
    ------
    ValueError
        If ``blocks`` has no stage or more than four.

    Attributes
    ----------
    conv1, bn1, maxpool : torch.nn.Module
        The stem.
    layer1, layer2, layer3, layer4 : torch.nn.Module
        The stages (``torch.nn.Identity`` beyond ``len(blocks)``).
    avgpool, fc : torch.nn.Module
        Global average pooling and the classifier.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.experiments.zoo import ResNet
    >>> net = ResNet(blocks=(1,), widths=(8,), num_classes=3, in_channels=1)
    >>> tuple(net(torch.randn(2, 1, 16, 16)).shape)
    (2, 3)
    """

    def __init__(self, blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512), num_classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        if not 1 <= len(blocks) <= 4:
            raise ValueError(f"ResNet has one to four stages, got {len(blocks)} in blocks")
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
        """Class scores of a batch of images.

        Parameters
        ----------
        x : torch.Tensor
            ``(N, in_channels, H, W)`` images.

        Returns
        -------
        torch.Tensor
            ``(N, num_classes)`` logits.

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.experiments.zoo import small_resnet
        >>> tuple(small_resnet(num_classes=5)(torch.randn(2, 3, 32, 32)).shape)
        (2, 5)
        """
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 10) -> ResNet:
    """ResNet-18 (11.2 M parameters with 10 classes).

    Parameters
    ----------
    num_classes : int
        Outputs of the classifier.

    Returns
    -------
    ResNet
        Stages of 2, 2, 2, 2 blocks with 64, 128, 256, 512 channels, on RGB images.

    Examples
    --------
    >>> from manifold_nets.experiments.zoo import resnet18
    >>> sum(p.numel() for p in resnet18().parameters())
    11181642
    """
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes)


def small_resnet(num_classes: int = 10) -> ResNet:
    """A ResNet with the same layout and widths 8, 16 (one block per stage).

    Parameters
    ----------
    num_classes : int
        Outputs of the classifier.

    Returns
    -------
    ResNet
        Two stages of one :class:`BasicBlock` each, on RGB images; small enough for tests.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.experiments.zoo import small_resnet
    >>> net = small_resnet(num_classes=10)
    >>> tuple(net(torch.randn(2, 3, 32, 32)).shape), isinstance(net.layer3, torch.nn.Identity)
    ((2, 10), True)
    """
    return ResNet((1, 1), (8, 16), num_classes)


class PreLNBlock(nn.Module):
    """``x + attn(ln1(x))``, then ``x + fc2(act(fc1(ln2(x))))``.

    Parameters
    ----------
    d : int
        The model width (embedding size).
    heads : int
        Attention heads (``d`` must be divisible by ``heads``).
    mlp : int
        Hidden units of the MLP.
    activation : type
        The MLP's activation, a ``torch.nn.Module`` class (default ``torch.nn.ReLU``).

    Attributes
    ----------
    ln1, attn, ln2, fc1, act, fc2 : torch.nn.Module
        The layer norms, the ``torch.nn.MultiheadAttention`` (batch first) and the MLP.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.experiments.zoo import PreLNBlock
    >>> tuple(PreLNBlock(d=8, heads=2, mlp=16)(torch.randn(2, 5, 8)).shape)
    (2, 5, 8)
    """

    def __init__(self, d: int, heads: int, mlp: int, activation: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, mlp)
        self.act = activation()
        self.fc2 = nn.Linear(mlp, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block on a batch of sequences.

        Parameters
        ----------
        x : torch.Tensor
            ``(N, T, d)`` embeddings.

        Returns
        -------
        torch.Tensor
            ``(N, T, d)``.

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.experiments.zoo import PreLNBlock
        >>> block = PreLNBlock(d=8, heads=2, mlp=16)
        >>> x = torch.randn(1, 5, 8)
        >>> tuple(block(x).shape), torch.allclose(block(x), block(x))
        ((1, 5, 8), True)
        """
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class PreLNTransformer(nn.Module):
    """Token and position embeddings, pre-LN blocks, a final layer norm, a linear head
    (per-token logits).

    Parameters
    ----------
    vocab : int
        Tokens in the vocabulary.
    d : int
        The model width.
    heads : int
        Attention heads per block.
    mlp : int
        Hidden units of each block's MLP.
    layers : int
        :class:`PreLNBlock` count.
    context : int
        The longest sequence (positions embedded).
    out : int, optional
        Outputs of the head (default: ``vocab``).
    activation : type
        The MLPs' activation class (default ``torch.nn.ReLU``).

    Attributes
    ----------
    tok, pos : torch.nn.Embedding
        Token and position embeddings.
    blocks : torch.nn.ModuleList
        The pre-LN blocks.
    ln_f, head : torch.nn.Module
        The final layer norm and the linear head.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.experiments.zoo import PreLNTransformer
    >>> net = PreLNTransformer(vocab=20, d=8, heads=2, mlp=16, layers=1, context=6)
    >>> tuple(net(torch.randint(0, 20, (2, 6))).shape)
    (2, 6, 20)
    """

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
        """Per-token logits of a batch of token sequences.

        Parameters
        ----------
        tokens : torch.Tensor
            ``(N, T)`` token ids, ``T <= context``.

        Returns
        -------
        torch.Tensor
            ``(N, T, out)`` logits.

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.experiments.zoo import PreLNTransformer
        >>> net = PreLNTransformer(vocab=20, d=8, heads=2, mlp=16, layers=1, context=6, out=3)
        >>> tuple(net(torch.randint(0, 20, (2, 4))).shape)
        (2, 4, 3)
        """
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok(tokens) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def pre_ln_transformer(**kwargs) -> PreLNTransformer:
    """A small pre-LN transformer (see :class:`PreLNTransformer` for the options).

    Parameters
    ----------
    **kwargs
        Passed to :class:`PreLNTransformer` (defaults: vocabulary 100, width 32, 4 heads,
        MLP 64, 2 layers, context 16).

    Returns
    -------
    PreLNTransformer
        The model.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.experiments.zoo import pre_ln_transformer
    >>> net = pre_ln_transformer(layers=1)
    >>> len(net.blocks), tuple(net(torch.randint(0, 100, (2, 16))).shape)
    (1, (2, 16, 100))
    """
    return PreLNTransformer(**kwargs)


class VisionTransformer(nn.Module):
    """A ViT: non-overlapping patches embedded by a strided conv, learned position
    embeddings, pre-LN blocks, a final layer norm, the mean over tokens, a linear head.

    Parameters
    ----------
    image : int
        Height and width of the (square) input images.
    patch : int
        Height and width of a patch (``image`` must be divisible by ``patch``).
    in_channels : int
        Channels of the input images.
    d, heads, mlp, layers : int
        Width, attention heads, MLP hidden units and :class:`PreLNBlock` count.
    num_classes : int
        Outputs of the head.
    activation : type
        The MLPs' activation class (default ``torch.nn.GELU``, as in ViT).

    Raises
    ------
    ValueError
        If ``image`` is not a multiple of ``patch``.

    Attributes
    ----------
    embed : torch.nn.Conv2d
        The patch embedding (kernel and stride ``patch``).
    pos : torch.nn.Parameter
        ``(tokens, d)`` position embeddings.
    blocks : torch.nn.ModuleList
        The pre-LN blocks.
    ln_f, head : torch.nn.Module
        The final layer norm and the classifier.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.experiments.zoo import VisionTransformer
    >>> net = VisionTransformer(image=28, patch=7, in_channels=1, d=16, heads=2, mlp=32,
    ...                         layers=1, num_classes=10)
    >>> tuple(net(torch.randn(2, 1, 28, 28)).shape), tuple(net.pos.shape)
    ((2, 10), (16, 16))
    """

    def __init__(self, image: int = 28, patch: int = 7, in_channels: int = 1, d: int = 64,
                 heads: int = 4, mlp: int = 128, layers: int = 3, num_classes: int = 10,
                 activation: type[nn.Module] = nn.GELU):
        super().__init__()
        if image % patch:
            raise ValueError(f"image size {image} is not a multiple of the patch {patch}")
        self.embed = nn.Conv2d(in_channels, d, patch, stride=patch)
        self.pos = nn.Parameter(0.02 * torch.randn((image // patch) ** 2, d))
        self.blocks = nn.ModuleList(PreLNBlock(d, heads, mlp, activation)
                                    for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images.

        Parameters
        ----------
        x : torch.Tensor
            ``(N, in_channels, image, image)``.

        Returns
        -------
        torch.Tensor
            ``(N, num_classes)`` logits.

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.experiments.zoo import VisionTransformer
        >>> net = VisionTransformer(d=8, heads=2, mlp=16, layers=1)
        >>> tuple(net(torch.randn(3, 1, 28, 28)).shape)
        (3, 10)
        """
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x).mean(1))


def gpt2_block(d: int = 768, heads: int = 12, mlp: int = 3072) -> nn.Module:
    """One GPT-2-small-sized pre-LN block on embeddings ``(N, T, d)``, with a final layer
    norm.

    Parameters
    ----------
    d : int
        The width (768 in GPT-2 small).
    heads : int
        Attention heads (12).
    mlp : int
        Hidden units of the MLP (3072).

    Returns
    -------
    torch.nn.Module
        ``torch.nn.Sequential(PreLNBlock(d, heads, mlp), torch.nn.LayerNorm(d))``.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.experiments.zoo import gpt2_block
    >>> sum(p.numel() for p in gpt2_block().parameters())
    7089408
    >>> tuple(gpt2_block(d=16, heads=2, mlp=32)(torch.randn(2, 5, 16)).shape)
    (2, 5, 16)
    """
    return nn.Sequential(PreLNBlock(d, heads, mlp), nn.LayerNorm(d))


class ResidualMLP(nn.Module):
    """``x = inp(x)``, then blocks ``x + fc2(relu(fc1(x)))``, then ``head(relu(x))``;
    biases everywhere.

    Parameters
    ----------
    d_in : int
        Input features.
    d : int
        Width of the residual stream.
    hidden : int
        Hidden units of each block.
    blocks : int
        Residual blocks.
    out : int
        Outputs of the head.

    Attributes
    ----------
    inp, head : torch.nn.Linear
        The input projection and the head.
    blocks : torch.nn.ModuleList
        ``Linear(d, hidden), ReLU, Linear(hidden, d)`` per block.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.experiments.zoo import ResidualMLP
    >>> tuple(ResidualMLP(d_in=5, out=3)(torch.randn(4, 5)).shape)
    (4, 3)
    """

    def __init__(self, d_in: int = 5, d: int = 8, hidden: int = 16, blocks: int = 2,
                 out: int = 3):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.ReLU(),
                                                  nn.Linear(hidden, d))
                                    for _ in range(blocks))
        self.head = nn.Linear(d, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The outputs of a batch.

        Parameters
        ----------
        x : torch.Tensor
            ``(N, d_in)``.

        Returns
        -------
        torch.Tensor
            ``(N, out)``.

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.experiments.zoo import ResidualMLP
        >>> tuple(ResidualMLP(d_in=2, out=1)(torch.randn(4, 2)).shape)
        (4, 1)
        """
        x = self.inp(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(torch.relu(x))


def residual_mlp(**kwargs) -> ResidualMLP:
    """A residual MLP (see :class:`ResidualMLP` for the options).

    Parameters
    ----------
    **kwargs
        Passed to :class:`ResidualMLP` (defaults: 5 inputs, width 8, 16 hidden units,
        2 blocks, 3 outputs).

    Returns
    -------
    ResidualMLP
        The model.

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.experiments.zoo import residual_mlp
    >>> tuple(residual_mlp(blocks=1)(torch.randn(4, 5)).shape)
    (4, 3)
    """
    return ResidualMLP(**kwargs)
