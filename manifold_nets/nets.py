r"""The paper's two networks, Arch1 and Arch2 (Section 2, Figures 1 and 2).

Each hidden layer :math:`l = 1 .. L` maps its input :math:`m_{l-1}` (with
:math:`m_0 = x`, the flattened image) to

.. math::

    h_l = W_l m_{l-1}, \quad
    [\text{Arch2: } b_l = \mathrm{BN}(h_l)], \quad
    r_l = \max(h_l, 0) \ [\text{or } \max(b_l, 0)], \quad
    m_{l,k} = \max(r_{l,2k}, r_{l,2k+1}),

with a bias-free :math:`W_l` whose ``width`` rows are the filters. The soft-max classifier
:math:`\theta` (``num_classes x width/2``, bias-free) gives the logits
:math:`\theta m_L`; the loss (summed cross-entropy) lives with the training code.

Attributes are plain and stable, so that :mod:`manifold_nets.declare` and
:mod:`manifold_nets.symmetry` can address them:

- ``model.layers[l].linear``: the ``nn.Linear`` holding :math:`W_{l+1}` (0-based ``l``);
- ``model.layers[l].bn``: Arch2's ``nn.BatchNorm1d(width, affine=True)`` (``None`` in
  Arch1);
- ``model.classifier``: the ``nn.Linear`` holding :math:`\theta`.

Initialisation (the paper and its released code): standard Gaussian, then every filter
(row of :math:`W_l`) and every class vector (row of :math:`\theta`) scaled to unit norm.

The convolutional networks of Section 6 live here too: :class:`SegNet` (built from
:class:`ConvBNReLU` layers, configured by :class:`SegNetConfig`) and
:func:`segnet_basic`.

Examples
--------
>>> import torch
>>> from manifold_nets.nets import NetConfig, build_net
>>> net = build_net(NetConfig(arch=2, depth=2, width=8, in_features=12, num_classes=3))
>>> type(net).__name__, net(torch.rand(5, 12)).shape
('Arch2', torch.Size([5, 3]))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.fx
from torch import nn

__all__ = ["NetConfig", "PoolLayer", "Arch1", "Arch2", "build_net", "pair_max_pool",
           "SegNetConfig", "ConvBNReLU", "SegNet", "segnet_basic"]


@dataclass(frozen=True)
class NetConfig:
    """Everything that defines an Arch1 / Arch2 network (saved with results).

    A frozen dataclass: the parameters are kept as the attributes of the same names.
    :func:`build_net` builds the network it describes.

    Parameters
    ----------
    arch : int
        ``1`` (no batch norm) or ``2`` (batch norm before every ReLU)
    depth : int
        number of hidden layers :math:`L \\ge 1`
    width : int
        filters per hidden layer (even: pooling takes consecutive pairs)
    in_features : int
        input dimension (784 for flattened MNIST)
    num_classes : int
        number of classes :math:`K`
    bn_eps : float
        batch-norm ``eps`` (Arch2 only), positive
    bn_momentum : float
        batch-norm running-statistics momentum (Arch2 only)

    Attributes
    ----------
    arch : int
        ``1`` or ``2``
    depth : int
        number of hidden layers
    width : int
        filters per hidden layer
    in_features : int
        input dimension
    num_classes : int
        number of classes
    bn_eps : float
        batch-norm ``eps``
    bn_momentum : float
        batch-norm momentum

    Raises
    ------
    ValueError
        if ``arch`` is not 1 or 2, a size is not a positive integer, ``width`` is odd, or
        ``bn_eps`` is not positive (the message says how to fix it)

    Examples
    --------
    >>> from manifold_nets.nets import NetConfig
    >>> NetConfig(arch=2, depth=4).to_dict()["width"]
    64
    >>> NetConfig(width=7)
    Traceback (most recent call last):
    ...
    ValueError: width must be even (max-pooling takes consecutive pairs of the 7 filters), ...
    """

    arch: int = 1
    depth: int = 2
    width: int = 64
    in_features: int = 784
    num_classes: int = 10
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1

    def __post_init__(self):
        if self.arch not in (1, 2):
            raise ValueError(f"arch must be 1 or 2, got {self.arch!r}")
        for name in ("depth", "width", "in_features", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.width % 2:
            raise ValueError(
                f"width must be even (max-pooling takes consecutive pairs of the {self.width} "
                f"filters), got width={self.width}; use {self.width + 1} or {self.width - 1}"
            )
        if not self.bn_eps > 0:
            raise ValueError(f"bn_eps must be > 0 (torch refuses eps = 0 in training), got "
                             f"{self.bn_eps!r}; use e.g. 1e-30 for an effectively exact "
                             "scale invariance in float64")

    def to_dict(self) -> dict:
        """The configuration as a plain ``dict`` (for JSON, and to save with results).

        Returns
        -------
        dict
            field name -> value

        Examples
        --------
        >>> from manifold_nets.nets import NetConfig
        >>> d = NetConfig(depth=4).to_dict()
        >>> list(d), d["depth"]
        (['arch', 'depth', 'width', 'in_features', 'num_classes', 'bn_eps', 'bn_momentum'], 4)
        """
        return asdict(self)


def pair_max_pool(r: torch.Tensor) -> torch.Tensor:
    r"""Max-pooling over consecutive pairs of the last dimension (2x1, stride 2).

    .. math:: m_k = \max(r_{2k}, r_{2k+1})

    Parameters
    ----------
    r : torch.Tensor
        activations; the last dim (of even size) holds the filters' outputs

    Returns
    -------
    torch.Tensor
        the pooled activations: the last dim halved

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.nets import pair_max_pool
    >>> pair_max_pool(torch.tensor([1.0, 5.0, 3.0, 2.0])).tolist()
    [5.0, 3.0]
    """
    return r.unflatten(-1, (r.shape[-1] // 2, 2)).amax(dim=-1)


class PoolLayer(nn.Module):
    r"""One hidden layer: :math:`m = \mathrm{pool}(\mathrm{ReLU}([\mathrm{BN}](W x)))`.

    Parameters
    ----------
    in_features : int
        input dimension
    width : int
        number of filters (rows of :math:`W`), even
    batch_norm : bool
        put ``nn.BatchNorm1d(width, affine=True)`` between :math:`W x` and the ReLU
    bn_eps, bn_momentum : float
        batch-norm settings

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.nets import PoolLayer
    >>> layer = PoolLayer(6, 4, batch_norm=True)
    >>> tuple(layer.linear.weight.shape), layer(torch.randn(5, 6)).shape
    ((4, 6), torch.Size([5, 2]))
    """

    def __init__(self, in_features: int, width: int, batch_norm: bool = False,
                 bn_eps: float = 1e-5, bn_momentum: float = 0.1):
        super().__init__()
        self.linear = nn.Linear(in_features, width, bias=False)
        self.bn = (nn.BatchNorm1d(width, eps=bn_eps, momentum=bn_momentum, affine=True)
                   if batch_norm else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r"""The layer's output :math:`\mathrm{pool}(\mathrm{ReLU}([\mathrm{BN}](W x)))`.

        Parameters
        ----------
        x : torch.Tensor
            a batch of inputs ``(N, in_features)``

        Returns
        -------
        torch.Tensor
            ``(N, width // 2)``

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.nets import PoolLayer
        >>> PoolLayer(6, 4)(torch.randn(5, 6)).shape
        torch.Size([5, 2])
        """
        h = self.linear(x)
        if self.bn is not None:
            h = self.bn(h)
        return pair_max_pool(torch.relu(h))


class _PoolNet(nn.Module):
    def __init__(self, config: NetConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        c = config
        sizes = [c.in_features] + [c.width // 2] * c.depth
        self.layers = nn.ModuleList(
            PoolLayer(sizes[i], c.width, batch_norm=c.arch == 2, bn_eps=c.bn_eps,
                      bn_momentum=c.bn_momentum)
            for i in range(c.depth)
        )
        self.classifier = nn.Linear(c.width // 2, c.num_classes, bias=False)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The paper's initialisation: Gaussian, then every row of every matrix unit-norm.

        Batch-norm scale and shift are reset to 1 and 0, running statistics to 0 and 1.

        Parameters
        ----------
        generator : torch.Generator, optional
            source of the Gaussian draws (in float64, then copied into the weights)

        Examples
        --------
        >>> import torch
        >>> from manifold_nets import Arch1
        >>> net = Arch1(depth=1, width=4, in_features=3, num_classes=2)
        >>> net.reset_parameters(torch.Generator().manual_seed(0))
        >>> torch.allclose(net.theta.detach().norm(dim=1), torch.ones(2))
        True
        """
        for w in self.filters() + [self.classifier.weight]:
            g = torch.randn(w.shape, generator=generator, dtype=torch.float64)
            w.copy_(g / g.norm(dim=1, keepdim=True))
        for layer in self.layers:
            if layer.bn is not None:
                layer.bn.reset_parameters()

    def filters(self) -> list[nn.Parameter]:
        r"""The filter weights :math:`W_1 .. W_L`, in order.

        Returns
        -------
        list of nn.Parameter
            the weights of ``layers[l].linear``, ``(width, in)`` each

        Examples
        --------
        >>> from manifold_nets import Arch1
        >>> [tuple(w.shape) for w in Arch1(depth=2, width=4, in_features=3).filters()]
        [(4, 3), (4, 2)]
        """
        return [layer.linear.weight for layer in self.layers]

    def named_filters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of every :math:`W_l`, names as in ``named_parameters``.

        Returns
        -------
        list of (str, nn.Parameter)
            the filters of :meth:`filters` with their names

        Examples
        --------
        >>> from manifold_nets import Arch1
        >>> [name for name, _ in Arch1(depth=2, width=4, in_features=3).named_filters()]
        ['layers.0.linear.weight', 'layers.1.linear.weight']
        """
        return [(f"layers.{i}.linear.weight", layer.linear.weight)
                for i, layer in enumerate(self.layers)]

    @property
    def theta(self) -> nn.Parameter:
        r"""The classifier :math:`\theta` (``num_classes x width/2``).

        Returns
        -------
        nn.Parameter
            ``classifier.weight``

        Examples
        --------
        >>> from manifold_nets import Arch1
        >>> Arch1(depth=2, width=8, in_features=3, num_classes=5).theta.shape
        torch.Size([5, 4])
        """
        return self.classifier.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch; images of any shape are flattened from dim 1 on.

        Parameters
        ----------
        x : torch.Tensor
            a batch ``(N, ...)`` of ``in_features`` values per example

        Returns
        -------
        torch.Tensor
            logits :math:`\\theta m_L`, ``(N, num_classes)``

        Examples
        --------
        >>> import torch
        >>> from manifold_nets import Arch1
        >>> Arch1(depth=1, width=4, in_features=12, num_classes=3)(torch.rand(5, 3, 4)).shape
        torch.Size([5, 3])
        """
        m = x.flatten(1)
        for layer in self.layers:
            m = layer(m)
        return self.classifier(m)

    def extra_repr(self) -> str:
        """The sizes shown in the network's ``repr``.

        Returns
        -------
        str
            depth, width, input and class counts

        Examples
        --------
        >>> from manifold_nets import Arch1
        >>> Arch1(depth=2, width=8, in_features=12, num_classes=3).extra_repr()
        'depth=2, width=8, in_features=12, num_classes=3'
        """
        c = self.config
        return f"depth={c.depth}, width={c.width}, in_features={c.in_features}, " \
               f"num_classes={c.num_classes}"


class Arch1(_PoolNet):
    r"""Arch1 (Figure 1): bias-free linear filters, ReLU, pair max-pooling; soft-max.

    Parameters
    ----------
    depth : int
        number of hidden layers (the paper uses 2 and 4)
    width : int
        filters per layer, even (the paper uses 64)
    in_features, num_classes : int
        784 and 10 for MNIST
    generator : torch.Generator, optional
        source of the Gaussian initialisation

    Examples
    --------
    >>> import torch
    >>> from manifold_nets import Arch1
    >>> net = Arch1(depth=2, width=8, in_features=12, num_classes=3)
    >>> net(torch.rand(5, 12)).shape
    torch.Size([5, 3])
    >>> [tuple(w.shape) for w in net.filters()], tuple(net.theta.shape)
    ([(8, 12), (8, 4)], (3, 4))
    """

    def __init__(self, depth: int = 2, width: int = 64, in_features: int = 784,
                 num_classes: int = 10, *, generator: torch.Generator | None = None):
        super().__init__(NetConfig(1, depth, width, in_features, num_classes), generator)


class Arch2(_PoolNet):
    r"""Arch2 (Figure 2): Arch1 with batch norm (trainable scale and shift) before the ReLU.

    Parameters
    ----------
    depth, width, in_features, num_classes, generator
        as for :class:`Arch1`
    bn_eps : float
        batch-norm ``eps`` (default ``1e-5``, PyTorch's). A positive ``eps`` breaks the
        scale invariance of eq. (3) when the filters are small (see
        :mod:`manifold_nets.symmetry`).
    bn_momentum : float
        batch-norm running-statistics momentum

    Examples
    --------
    >>> import torch
    >>> from manifold_nets import Arch2
    >>> net = Arch2(depth=1, width=4, in_features=6, num_classes=2)
    >>> net.layers[0].bn
    BatchNorm1d(4, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)
    """

    def __init__(self, depth: int = 2, width: int = 64, in_features: int = 784,
                 num_classes: int = 10, *, bn_eps: float = 1e-5, bn_momentum: float = 0.1,
                 generator: torch.Generator | None = None):
        super().__init__(
            NetConfig(2, depth, width, in_features, num_classes, bn_eps, bn_momentum),
            generator,
        )


def build_net(config: NetConfig, generator: torch.Generator | None = None) -> _PoolNet:
    """Build :class:`Arch1` or :class:`Arch2` from a :class:`NetConfig`.

    Parameters
    ----------
    config : NetConfig
        the network; ``config.arch`` chooses the class
    generator : torch.Generator, optional
        source of the Gaussian initialisation

    Returns
    -------
    Arch1 or Arch2
        the network, initialised as in the paper; ``net.config == config``

    Examples
    --------
    >>> from manifold_nets.nets import NetConfig, build_net
    >>> config = NetConfig(arch=2, depth=1, width=4, in_features=6, num_classes=3)
    >>> net = build_net(config)
    >>> type(net).__name__, net.config == config
    ('Arch2', True)
    """
    c = config
    if c.arch == 1:
        return Arch1(c.depth, c.width, c.in_features, c.num_classes, generator=generator)
    return Arch2(c.depth, c.width, c.in_features, c.num_classes, bn_eps=c.bn_eps,
                 bn_momentum=c.bn_momentum, generator=generator)


# --------------------------------------------------------------------------------------
# SegNet (Section 6): the convolutional form of Arch2.


@dataclass(frozen=True)
class SegNetConfig:
    r"""Everything that defines a :class:`SegNet` (saved with results).

    A frozen dataclass: the parameters are kept as the attributes of the same names
    (``widths`` as a tuple). :meth:`SegNet.from_config` builds the network it describes.

    Parameters
    ----------
    widths : tuple of int
        filters of every conv in encoder block ``i`` (one block per pooling level)
    convs_per_block : int
        conv-BN-ReLU layers per encoder (and per decoder) block
    in_channels : int
        image channels (3 for CamVid)
    num_classes : int
        per-pixel classes :math:`K` (11 for CamVid)
    kernel_size : int
        odd square kernel of every conv but the classifier
    bn_eps, bn_momentum : float
        batch-norm settings
    decoder_relu : bool
        ReLU after the decoder's batch norms (SegNet-Basic has none there)
    input_lrn : bool
        local response normalisation of the input (SegNet-Basic's first layer: 5
        channels, :math:`\alpha = 10^{-4}`, :math:`\beta = 0.75`, Caffe's defaults)

    Attributes
    ----------
    widths : tuple of int
        filters per encoder block
    convs_per_block : int
        conv layers per block
    in_channels, num_classes, kernel_size : int
        image channels, classes and kernel size
    bn_eps, bn_momentum : float
        batch-norm settings
    decoder_relu, input_lrn : bool
        ReLU in the decoder, LRN of the input

    Raises
    ------
    ValueError
        if ``widths`` is empty, a size is not a positive integer, ``kernel_size`` is even,
        or ``bn_eps`` is not positive

    Examples
    --------
    >>> from manifold_nets.nets import SegNetConfig
    >>> SegNetConfig(widths=[16, 32]).widths
    (16, 32)
    >>> SegNetConfig(kernel_size=4)
    Traceback (most recent call last):
    ...
    ValueError: kernel_size must be odd (same padding), got 4
    """

    widths: tuple[int, ...] = (16, 32, 64)
    convs_per_block: int = 1
    in_channels: int = 1
    num_classes: int = 11
    kernel_size: int = 3
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    decoder_relu: bool = True
    input_lrn: bool = False

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(self.widths))
        if not self.widths:
            raise ValueError("widths must hold at least one block width, got ()")
        for name, value in [("widths", w) for w in self.widths] + [
            ("convs_per_block", self.convs_per_block), ("in_channels", self.in_channels),
            ("num_classes", self.num_classes), ("kernel_size", self.kernel_size)
        ]:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must hold positive integers, got {value!r}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {self.kernel_size}")
        if not self.bn_eps > 0:
            raise ValueError(f"bn_eps must be > 0 (torch refuses eps = 0 in training), got "
                             f"{self.bn_eps!r}; use e.g. 1e-30 for an effectively exact "
                             "scale invariance in float64")

    def to_dict(self) -> dict:
        """The configuration as a plain ``dict`` (for JSON, and to save with results).

        Returns
        -------
        dict
            field name -> value

        Examples
        --------
        >>> from manifold_nets.nets import SegNetConfig
        >>> d = SegNetConfig.basic().to_dict()
        >>> d["widths"], d["kernel_size"], len(d)
        ((64, 64, 64, 64), 7, 9)
        """
        return asdict(self)

    @classmethod
    def basic(cls, width: int = 64, num_classes: int = 11) -> SegNetConfig:
        """SegNet-Basic's configuration (see :func:`segnet_basic`).

        Parameters
        ----------
        width : int
            filters of every 7x7 conv (64 in the reference)
        num_classes : int
            per-pixel classes (11 for CamVid)

        Returns
        -------
        SegNetConfig
            4 blocks of ``width`` filters, one 7x7 conv each, RGB input with local response
            normalisation, no ReLU in the decoder

        Examples
        --------
        >>> from manifold_nets.nets import SegNetConfig
        >>> c = SegNetConfig.basic(width=32)
        >>> c.widths, c.kernel_size, c.in_channels, c.decoder_relu, c.input_lrn
        ((32, 32, 32, 32), 7, 3, False, True)
        """
        return cls((width,) * 4, 1, 3, num_classes, 7, decoder_relu=False, input_lrn=True)


class ConvBNReLU(nn.Module):
    r"""One conv layer of SegNet: :math:`r = \max(\mathrm{BN}(W * x), 0)`, bias-free ``W``
    (:math:`r = \mathrm{BN}(W * x)` with ``relu=False``).

    ``conv.weight`` has shape ``(out, in, k, k)``; each of its ``out`` filters is a point
    of the oblique manifold under UN (``ObliqueManifold(3)``).

    Parameters
    ----------
    in_channels, out_channels : int
        channels in and filters out
    kernel_size : int
        odd square kernel; the padding ``kernel_size // 2`` keeps height and width
    bn_eps, bn_momentum : float
        batch-norm settings
    relu : bool
        apply the ReLU (default ``True``)

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.nets import ConvBNReLU
    >>> layer = ConvBNReLU(3, 8)
    >>> tuple(layer.conv.weight.shape), layer(torch.randn(2, 3, 5, 5)).shape
    ((8, 3, 3, 3), torch.Size([2, 8, 5, 5]))
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 bn_eps: float = 1e-5, bn_momentum: float = 0.1, relu: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size,
                              padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum, affine=True)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r"""The layer's output :math:`\max(\mathrm{BN}(W * x), 0)` (no max with ``relu=False``).

        Parameters
        ----------
        x : torch.Tensor
            images ``(N, in_channels, H, W)``

        Returns
        -------
        torch.Tensor
            ``(N, out_channels, H, W)``

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.nets import ConvBNReLU
        >>> bool((ConvBNReLU(3, 8)(torch.randn(2, 3, 5, 5)) >= 0).all())
        True
        """
        x = self.bn(self.conv(x))
        return torch.relu(x) if self.relu else x

    def extra_repr(self) -> str:
        """What the layer's ``repr`` adds to its submodules: ``relu=False`` when it has no
        ReLU.

        Returns
        -------
        str
            ``""`` or ``"relu=False"``

        Examples
        --------
        >>> from manifold_nets.nets import ConvBNReLU
        >>> ConvBNReLU(3, 8).extra_repr(), ConvBNReLU(3, 8, relu=False).extra_repr()
        ('', 'relu=False')
        """
        return "" if self.relu else "relu=False"


@torch.fx.wrap
def _check_segnet_input(x: torch.Tensor, pools: int) -> None:
    """A clear error for images SegNet cannot take (a leaf of torch.fx traces)."""
    levels = 2 ** pools
    if x.dim() != 4 or x.shape[-1] < levels or x.shape[-2] < levels:
        raise ValueError(
            f"SegNet needs images (N, C, H, W) with H and W at least {levels} "
            f"({pools} pooling levels), got shape {tuple(x.shape)}"
        )


class SegNet(nn.Module):
    r"""A compact SegNet (Badrinarayanan et al., 2015a; the paper's Section 6).

    Encoder block ``i`` (``i = 0 .. B-1``): ``convs_per_block`` conv-BN-ReLU layers with
    ``widths[i]`` filters, then 2x2 max-pooling that keeps its arg-max indices. Decoder
    block ``i`` mirrors it: max-unpooling with encoder block ``i``'s indices (every value
    goes back to the position it was pooled from, zeros elsewhere), then
    ``convs_per_block`` conv-BN-ReLU layers, the last of which has the width of encoder
    block ``i-1`` (``widths[0]`` for ``i = 0``). A bias-free 1x1 conv ``classifier``
    (:math:`\theta`, ``num_classes x widths[0]``) gives per-pixel logits; the soft-max lives
    in the loss.

    Every conv but the classifier is followed by batch norm, so the loss is invariant
    under ``W -> A W`` for any positive diagonal ``A`` acting on the output filters of any
    such conv (the conv form of Arch2's eq. (3);
    :func:`~manifold_nets.symmetry.discover` finds exactly these). Input height and width must
    be at least ``2 ** len(widths)``; a side that a pooling halves with a remainder is
    restored to its size by the unpooling (360 x 480 CamVid images go 45 -> 22 -> 45).

    Attributes: ``encoder[i][j]`` and ``decoder[i][j]`` are :class:`ConvBNReLU` (with
    ``.conv`` and ``.bn``); ``decoder[i]`` runs after the unpooling of encoder block ``i``;
    ``classifier`` is the ``nn.Conv2d`` holding :math:`\theta`. Initialisation as in the
    paper: Gaussian, then every filter (``weight[o]``) of every conv, the classifier
    included, scaled to unit norm.

    Parameters
    ----------
    widths, convs_per_block, in_channels, num_classes, kernel_size, bn_eps, bn_momentum
        see :class:`SegNetConfig`
    decoder_relu, input_lrn : bool
        see :class:`SegNetConfig`
    generator : torch.Generator, optional
        source of the Gaussian initialisation

    Raises
    ------
    ValueError
        for a configuration that :class:`SegNetConfig` refuses

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.nets import SegNet
    >>> net = SegNet(widths=(4, 8), convs_per_block=1)
    >>> net(torch.rand(2, 1, 16, 16)).shape
    torch.Size([2, 11, 16, 16])
    >>> [tuple(w.shape) for w in net.filters()]
    [(4, 1, 3, 3), (8, 4, 3, 3), (4, 8, 3, 3), (4, 4, 3, 3)]
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), convs_per_block: int = 1,
                 in_channels: int = 1, num_classes: int = 11, kernel_size: int = 3, *,
                 bn_eps: float = 1e-5, bn_momentum: float = 0.1, decoder_relu: bool = True,
                 input_lrn: bool = False, generator: torch.Generator | None = None):
        super().__init__()
        c = SegNetConfig(tuple(widths), convs_per_block, in_channels, num_classes,
                         kernel_size, bn_eps, bn_momentum, decoder_relu, input_lrn)
        self.config = c
        self.lrn = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75) if c.input_lrn else None

        def layer(i: int, o: int, relu: bool = True) -> ConvBNReLU:
            return ConvBNReLU(i, o, c.kernel_size, c.bn_eps, c.bn_momentum, relu)

        ins = (c.in_channels,) + c.widths[:-1]
        self.encoder = nn.ModuleList(
            nn.Sequential(*[layer(ins[b] if j == 0 else w, w) for j in range(c.convs_per_block)])
            for b, w in enumerate(c.widths)
        )
        outs = (c.widths[0],) + c.widths[:-1]
        self.decoder = nn.ModuleList(
            nn.Sequential(*[layer(w, outs[b] if j == c.convs_per_block - 1 else w,
                                  c.decoder_relu)
                            for j in range(c.convs_per_block)])
            for b, w in enumerate(c.widths)
        )
        self.pool = nn.MaxPool2d(2, stride=2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, stride=2)
        self.classifier = nn.Conv2d(c.widths[0], c.num_classes, 1, bias=False)
        self.reset_parameters(generator)

    @classmethod
    def from_config(cls, config: SegNetConfig,
                    generator: torch.Generator | None = None) -> SegNet:
        """Build the network a :class:`SegNetConfig` describes.

        Parameters
        ----------
        config : SegNetConfig
            the network
        generator : torch.Generator, optional
            source of the Gaussian initialisation

        Returns
        -------
        SegNet
            the network, initialised as in the paper; ``net.config == config``

        Examples
        --------
        >>> from manifold_nets.nets import SegNet, SegNetConfig
        >>> config = SegNetConfig(widths=(4, 8))
        >>> SegNet.from_config(config).config == config
        True
        """
        c = config
        return cls(c.widths, c.convs_per_block, c.in_channels, c.num_classes, c.kernel_size,
                   bn_eps=c.bn_eps, bn_momentum=c.bn_momentum, decoder_relu=c.decoder_relu,
                   input_lrn=c.input_lrn, generator=generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Gaussian, then every filter unit-norm; batch norm reset to scale 1, shift 0.

        Every filter ``weight[o]`` of every conv, the classifier included, gets unit norm.

        Parameters
        ----------
        generator : torch.Generator, optional
            source of the Gaussian draws (in float64, then copied into the weights)

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.nets import SegNet
        >>> net = SegNet(widths=(4, 8))
        >>> net.reset_parameters(torch.Generator().manual_seed(0))
        >>> torch.allclose(net.filters()[1].detach().flatten(1).norm(dim=1), torch.ones(8))
        True
        """
        for w in self.filters() + [self.classifier.weight]:
            g = torch.randn(w.shape, generator=generator, dtype=torch.float64)
            w.copy_(g / g.flatten(1).norm(dim=1).view(-1, *([1] * (g.dim() - 1))))
        for m in self.conv_layers():
            m.bn.reset_parameters()

    def conv_layers(self) -> list[ConvBNReLU]:
        """Every conv-BN-ReLU layer: the encoder's in order, then the decoder's as run.

        Returns
        -------
        list of ConvBNReLU
            ``2 * len(widths) * convs_per_block`` layers (the classifier is not one)

        Examples
        --------
        >>> from manifold_nets.nets import SegNet
        >>> [m.conv.out_channels for m in SegNet(widths=(4, 8)).conv_layers()]
        [4, 8, 4, 4]
        """
        enc = [m for block in self.encoder for m in block]
        dec = [m for block in reversed(self.decoder) for m in block]
        return enc + dec

    def named_filters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, weight)`` of every conv followed by batch norm, as in ``named_parameters``.

        Returns
        -------
        list of (str, nn.Parameter)
            in the order of :meth:`conv_layers`

        Examples
        --------
        >>> from manifold_nets.nets import SegNet
        >>> net = SegNet(widths=(4, 8))
        >>> [name for name, _ in net.named_filters()]  # doctest: +NORMALIZE_WHITESPACE
        ['encoder.0.0.conv.weight', 'encoder.1.0.conv.weight', 'decoder.1.0.conv.weight',
         'decoder.0.0.conv.weight']
        """
        names = {id(m): n for n, m in self.named_modules()}
        return [(f"{names[id(m)]}.conv.weight", m.conv.weight) for m in self.conv_layers()]

    def filters(self) -> list[nn.Parameter]:
        """The conv weights followed by batch norm (not the classifier), in run order.

        Returns
        -------
        list of nn.Parameter
            ``(out, in, k, k)`` each: the weights of :meth:`named_filters`

        Examples
        --------
        >>> from manifold_nets.nets import SegNet
        >>> [tuple(w.shape) for w in SegNet(widths=(4, 8)).filters()][:2]
        [(4, 1, 3, 3), (8, 4, 3, 3)]
        """
        return [w for _, w in self.named_filters()]

    @property
    def theta(self) -> nn.Parameter:
        r"""The 1x1 classifier :math:`\theta` (``num_classes x widths[0] x 1 x 1``).

        Returns
        -------
        nn.Parameter
            ``classifier.weight``

        Examples
        --------
        >>> from manifold_nets.nets import SegNet
        >>> SegNet(widths=(4, 8)).theta.shape
        torch.Size([11, 4, 1, 1])
        """
        return self.classifier.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel logits ``(N, num_classes, H, W)`` of images ``(N, in_channels, H, W)``.

        Parameters
        ----------
        x : torch.Tensor
            images ``(N, in_channels, H, W)``, ``H`` and ``W`` at least ``2 ** len(widths)``

        Returns
        -------
        torch.Tensor
            logits ``(N, num_classes, H, W)``

        Raises
        ------
        ValueError
            if ``x`` is not 4-D or is smaller than ``2 ** len(widths)``

        Examples
        --------
        >>> import torch
        >>> from manifold_nets.nets import SegNet
        >>> net = SegNet(widths=(4, 8))
        >>> net(torch.rand(2, 1, 18, 10)).shape  # 18 -> 9 -> 4 -> 9 -> 18
        torch.Size([2, 11, 18, 10])
        >>> net(torch.rand(1, 1, 3, 3))
        Traceback (most recent call last):
        ...
        ValueError: SegNet needs images (N, C, H, W) with H and W at least 4 (2 pooling levels), ...
        """
        _check_segnet_input(x, len(self.encoder))
        if self.lrn is not None:
            x = self.lrn(x)
        indices, sizes = [], []
        for block in self.encoder:
            x = block(x)
            sizes.append(x.shape)
            x, idx = self.pool(x)
            indices.append(idx)
        for b in reversed(range(len(self.decoder))):
            x = self.unpool(x, indices[b], output_size=sizes[b])
            x = self.decoder[b](x)
        return self.classifier(x)

    def extra_repr(self) -> str:
        """The sizes shown in the network's ``repr``.

        Returns
        -------
        str
            widths, convs per block and classes

        Examples
        --------
        >>> from manifold_nets.nets import SegNet
        >>> SegNet(widths=(4, 8)).extra_repr()
        'widths=(4, 8), convs_per_block=1, num_classes=11'
        """
        c = self.config
        return f"widths={c.widths}, convs_per_block={c.convs_per_block}, " \
               f"num_classes={c.num_classes}"


def segnet_basic(width: int = 64, num_classes: int = 11, *,
                 generator: torch.Generator | None = None) -> SegNet:
    r"""SegNet-Basic, as the SegNet authors train it on CamVid (their SegNet-Tutorial's
    ``segnet_basic_train.prototxt``).

    Local response normalisation of the RGB input; 4 encoder stages of a 7x7 conv with
    ``width`` filters, batch norm, ReLU and 2x2 max-pooling with indices; 4 decoder stages
    of unpooling with those indices, a 7x7 conv with ``width`` filters and batch norm (no
    ReLU); a 1x1 classifier. The reference convs carry biases; every one but the
    classifier's feeds a batch norm, which removes them, so they are left out here, as is
    the classifier's bias (the classifier is the paper's :math:`\theta`).

    Parameters
    ----------
    width : int
        filters of every 7x7 conv (64 in the reference)
    num_classes : int
        per-pixel classes (CamVid: 11, the void label is ignored)
    generator : torch.Generator, optional
        source of the Gaussian initialisation

    Returns
    -------
    SegNet
        built from :meth:`SegNetConfig.basic`

    Examples
    --------
    >>> import torch
    >>> from manifold_nets.nets import segnet_basic
    >>> net = segnet_basic(width=8)
    >>> net(torch.rand(1, 3, 45, 60) * 255).shape
    torch.Size([1, 11, 45, 60])
    """
    return SegNet.from_config(SegNetConfig.basic(width, num_classes), generator=generator)
