"""DenseNet for CIFAR-sized images as a Theano graph on the blocks of one flat vector.

Huang, Liu, van der Maaten, Weinberger, "Densely connected convolutional
networks" (2016). The architecture is a *plan*: a list of named units
(``Conv``, ``BatchNorm``, ``Keep``, ``Concat``, ``Pool``, ``GlobalPool``,
``Dense``), from which the parameter layout, the initialisation and the
forward graph are all read, so the three cannot disagree. Each unit is a
NamedTuple whose first field is ``kind`` (a tuple still, for code that
indexes it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from gpu_ver.layers import ACTIVATIONS, batch_norm, check_activation, tt
from shared.errors import ConfigError
from shared.layout import ParamLayout

from theano.tensor.nnet import conv2d  # noqa: E402 (after gpu_ver.layers loaded the configuration)
from theano.tensor.signal.pool import pool_2d  # noqa: E402

from gpu_ver.conv import conv_gemm  # noqa: E402

CONV_IMPLS = ("gemm", "corrmm")


# --------------------------------------------------------------------------- the plan's units
class Conv(NamedTuple):
    """A convolution without bias: ``in_channels`` -> ``out_channels`` maps,
    ``kernel_size`` x ``kernel_size``, 'same' padding, on maps of size ``hw``."""
    kind: str              # "conv"
    name: str              # block prefix: the weights are ``<name>.W``
    in_channels: int
    out_channels: int
    kernel_size: int
    hw: tuple              # (H, W)


class BatchNorm(NamedTuple):
    """Batch norm then the activation over ``channels`` maps of size ``hw``
    (blocks ``<name>.scale``, ``<name>.shift``)."""
    kind: str              # "bn"
    name: str
    channels: int
    hw: tuple              # (H, W)


class Keep(NamedTuple):
    """Remember the current maps (the input a dense layer's output joins)."""
    kind: str              # "keep"


class Concat(NamedTuple):
    """Join the kept maps and the current ones along channels."""
    kind: str              # "concat"


class Pool(NamedTuple):
    """2x2 average pooling of ``channels`` maps of size ``hw`` (a transition's end)."""
    kind: str              # "pool"
    channels: int
    hw: tuple              # (H, W) before pooling


class GlobalPool(NamedTuple):
    """Average over all positions: (n, c, H, W) -> (n, c)."""
    kind: str              # "gap"


class Dense(NamedTuple):
    """The output layer ``h W + b`` (blocks ``fc.W`` (n_in, n_out), ``fc.b``)."""
    kind: str              # "fc"
    name: str
    n_in: int
    n_out: int


KEEP, CONCAT, GLOBAL_POOL = Keep("keep"), Concat("concat"), GlobalPool("gap")


@dataclass(frozen=True)
class DenseNet:
    """DenseNet for CIFAR-sized images (Huang, Liu, van der Maaten, Weinberger 2016).

    ``depth = 3 n + 4`` (``6 n + 4`` with bottleneck): a 3x3 conv to ``c0`` maps
    (16, or 2k with bottleneck); three dense blocks of n layers, each layer
    BN-act-conv3x3 producing ``k`` maps concatenated to its input (with
    bottleneck: BN-act-conv1x1 to 4k first); between blocks a transition
    BN-act-conv1x1 to ``floor(compression * c)`` maps and 2x2 average pooling;
    then BN-act, global average pooling, a dense layer to ``n_classes``.
    Convolutions have no bias; He-normal init ``N(0, 2 / fan_in)``; BN scale 1,
    shift 0; dense layer ``N(0, 1/fan_in)`` weights, zero bias.
    DenseNet-40, k = 12: 1,019,722 parameters.

    Batch norm: ``forward(..., bn_stats=None)`` uses batch statistics (training,
    and all hypergradient graphs); ``bn_stats`` = list of (mean, var) per BN
    layer uses those (evaluation with running averages kept by ``SGDState``).
    ``input_shape`` = (channels, height, width), height/width divisible by 4.
    ``batch_size`` is given to the convolutions as a static shape when set
    (``None``: any batch size). ``conv``: ``"gemm"`` (default; channel-major
    graph, ``gpu_ver/conv.py``) or ``"corrmm"`` (Theano's ``conv2d``); the
    same function of the same parameters, the first about 2.5x faster per
    training step on two CPU cores.
    """

    depth: int = 40
    growth: int = 12
    bottleneck: bool = False
    compression: float = 1.0
    n_classes: int = 10
    input_shape: tuple = (3, 32, 32)
    activation: str = "relu"
    batch_size: int | None = None
    conv: str = "gemm"

    def __post_init__(self):
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        per = 6 if self.bottleneck else 3
        if not isinstance(self.depth, (int, np.integer)) or self.depth < per + 4 or (self.depth - 4) % per:
            form = "6n + 4 (with bottleneck)" if self.bottleneck else "3n + 4"
            raise ConfigError(f"DenseNet depth {self.depth} is not of the form {form} with n >= 1 "
                              f"(e.g. {per + 4}, {2 * per + 4}, 40{'' if per == 3 else ', 100'})")
        if int(self.growth) < 1:
            raise ConfigError(f"DenseNet growth rate must be a positive integer, got {self.growth}")
        if not 0.0 < float(self.compression) <= 1.0:
            raise ConfigError(f"DenseNet compression must be in (0, 1], got {self.compression}")
        if len(self.input_shape) != 3 or self.input_shape[1] % 4 or self.input_shape[2] % 4:
            raise ConfigError(f"DenseNet input shape must be (channels, H, W) with H, W divisible by 4, "
                              f"got {self.input_shape}")
        if int(self.n_classes) < 2:
            raise ConfigError(f"DenseNet needs at least 2 classes, got {self.n_classes}")
        check_activation(self.activation)
        if self.conv not in CONV_IMPLS:
            raise ConfigError(f"DenseNet conv must be one of {', '.join(CONV_IMPLS)}, got {self.conv!r}")

    # -- architecture as a plan (shared by layout, init and forward) ------------
    @property
    def layers_per_block(self) -> int:
        return (self.depth - 4) // (6 if self.bottleneck else 3)

    def plan(self) -> list:
        """Units in order (``Conv``, ``BatchNorm``, ``Keep``, ``Concat``, ``Pool``,
        ``GlobalPool``, ``Dense``; each a NamedTuple whose first field is its ``kind``).

        A dense layer is Keep, BatchNorm, [Conv 1x1, BatchNorm,] Conv 3x3, Concat;
        ``hw`` = (H, W) of the maps entering that unit.
        """
        k = int(self.growth)
        c = 2 * k if self.bottleneck else 16
        H, W = self.input_shape[1:]
        units = [Conv("conv", "conv0", self.input_shape[0], c, 3, (H, W))]
        for b in range(1, 4):
            for i in range(1, self.layers_per_block + 1):
                p = f"b{b}.l{i:02d}"
                units.append(KEEP)
                if self.bottleneck:
                    units += [BatchNorm("bn", f"{p}.bn1", c, (H, W)), Conv("conv", f"{p}.conv1", c, 4 * k, 1, (H, W)),
                              BatchNorm("bn", f"{p}.bn2", 4 * k, (H, W)),
                              Conv("conv", f"{p}.conv2", 4 * k, k, 3, (H, W))]
                else:
                    units += [BatchNorm("bn", f"{p}.bn", c, (H, W)), Conv("conv", f"{p}.conv", c, k, 3, (H, W))]
                units.append(CONCAT)
                c += k
            if b < 3:
                cout = int(np.floor(self.compression * c))
                units += [BatchNorm("bn", f"t{b}.bn", c, (H, W)), Conv("conv", f"t{b}.conv", c, cout, 1, (H, W)),
                          Pool("pool", cout, (H, W))]
                c, H, W = cout, H // 2, W // 2
        units += [BatchNorm("bn", "final.bn", c, (H, W)), GLOBAL_POOL, Dense("fc", "fc", c, int(self.n_classes))]
        return units

    @property
    def layout(self) -> ParamLayout:
        names, shapes = [], []
        for u in self.plan():
            if u.kind == "conv":
                names.append(f"{u.name}.W")
                shapes.append((u.out_channels, u.in_channels, u.kernel_size, u.kernel_size))
            elif u.kind == "bn":
                names += [f"{u.name}.scale", f"{u.name}.shift"]
                shapes += [(u.channels,), (u.channels,)]
            elif u.kind == "fc":
                names += ["fc.W", "fc.b"]
                shapes += [(u.n_in, u.n_out), (u.n_out,)]
        return ParamLayout(tuple(names), tuple(shapes))

    def block_kinds(self) -> list:
        """Kind of each layout block: conv, bn_scale, bn_shift, fc_W, fc_b (for per-kind L2)."""
        out = []
        for n in self.layout.names:
            tail = n.rsplit(".", 1)[1]
            out.append({"W": "fc_W" if n == "fc.W" else "conv", "b": "fc_b",
                        "scale": "bn_scale", "shift": "bn_shift"}[tail])
        return out

    @property
    def bn_channels(self) -> tuple:
        return tuple(u.channels for u in self.bn_units())

    def bn_units(self) -> list:
        """The ``BatchNorm`` units of the plan, in order (one per running-average pair)."""
        return [u for u in self.plan() if u.kind == "bn"]

    @property
    def n_bn(self) -> int:
        return len(self.bn_channels)

    def describe(self) -> dict:
        return {"model": "densenet", "depth": int(self.depth), "growth": int(self.growth),
                "bottleneck": bool(self.bottleneck), "compression": float(self.compression),
                "n_classes": int(self.n_classes), "input_shape": list(self.input_shape),
                "activation": self.activation, "n_params": self.layout.size}

    def check_data(self, X, y, what="data") -> None:
        if X.ndim != 4 or tuple(X.shape[1:]) != self.input_shape:
            raise ConfigError(f"DenseNet expects {what} of shape (n, {', '.join(map(str, self.input_shape))}), "
                              f"got {X.shape}")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.n_classes):
            raise ConfigError(f"DenseNet: {what} has labels in [{y.min()}, {y.max()}], "
                              f"the output layer has {self.n_classes} classes")

    # -- parameters --------------------------------------------------------------
    def init(self, seed: int) -> np.ndarray:
        """He-normal conv weights, BN scale 1 / shift 0, dense N(0, 1/fan_in) and zero bias; float64."""
        rng = np.random.default_rng([int(seed), 7])
        out = []
        for name, shape in zip(self.layout.names, self.layout.shapes):
            if name.endswith(".scale"):
                out.append(np.ones(shape))
            elif name.endswith(".shift") or name == "fc.b":
                out.append(np.zeros(shape))
            elif name == "fc.W":
                out.append(rng.standard_normal(shape) / np.sqrt(shape[0]))
            else:
                fan_in = shape[1] * shape[2] * shape[3]
                out.append(rng.standard_normal(shape) * np.sqrt(2.0 / fan_in))
        return self.layout.flatten(out)

    def input_var(self, name="X"):
        return tt.tensor4(name)

    # -- graph -----------------------------------------------------------------------
    def forward(self, blocks, X, bn_stats=None):
        """Logits and the batch (mean, var) of every BN layer (``[]`` entries when ``bn_stats`` given).

        ``X`` is (n, c, H, W). With ``conv="gemm"`` (default) the network runs in
        (c, n, H, W) order (``gpu_ver/conv.py``): every convolution is one
        matrix product (plus, for 3x3, a sum of shifted planes), a
        concatenation joins contiguous blocks; ``conv="corrmm"`` keeps
        (n, c, H, W) and Theano's ``conv2d`` (CorrMM on the C backend). Same
        function of the same parameters (tests/test_gpu_models.py compares them).
        """
        p = dict(zip(self.layout.names, blocks))
        act = ACTIVATIONS[self.activation]
        B = self.batch_size
        cnhw = self.conv == "gemm"
        ca = 0 if cnhw else 1                                  # channel axis
        n = (X.shape[0] if B is None else B)
        h = X.dimshuffle(1, 0, 2, 3) if cnhw else X
        keep, out_stats, i_bn = None, [], 0
        for u in self.plan():
            kind = u.kind
            if kind == "conv":
                name, cin, cout, ks, (H, W) = u.name, u.in_channels, u.out_channels, u.kernel_size, u.hw
                if cnhw:
                    h = conv_gemm(h, p[f"{name}.W"], n, (H, W), cin, cout, ks)
                else:
                    h = conv2d(h, p[f"{name}.W"], input_shape=(B, cin, H, W), filter_shape=(cout, cin, ks, ks),
                               border_mode="half", filter_flip=False)
            elif kind == "bn":
                name = u.name
                h, st = batch_norm(h, p[f"{name}.scale"], p[f"{name}.shift"],
                                   None if bn_stats is None else bn_stats[i_bn], axis=ca)
                h = act(h)
                out_stats.append(st)
                i_bn += 1
            elif kind == "keep":
                keep = h
            elif kind == "concat":
                h = tt.concatenate([keep, h], axis=ca)
            elif kind == "pool":
                if cnhw:   # 2x2 average: a reshape and a mean (H, W even by construction)
                    c, (H, W) = u.channels, u.hw
                    h = h.reshape((c, n, H // 2, 2, W // 2, 2)).mean(axis=(3, 5))
                else:
                    h = pool_2d(h, ws=(2, 2), ignore_border=True, mode="average_inc_pad")
            elif kind == "gap":
                h = h.mean(axis=(2, 3)).T if cnhw else h.mean(axis=(2, 3))
            elif kind == "fc":
                h = tt.dot(h, p["fc.W"]) + p["fc.b"]
        return h, (out_stats if bn_stats is None else [])


def densenet_param_count(depth=40, growth=12, bottleneck=False, compression=1.0, n_classes=10,
                         input_shape=(3, 32, 32)) -> int:
    """Number of trainable parameters (no graph is built)."""
    return DenseNet(depth, growth, bottleneck, compression, n_classes, input_shape).layout.size
