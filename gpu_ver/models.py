"""MLP and DenseNet as Theano graphs on one flat parameter vector.

Objective (as in ``cpu_ver.models``), with a per-parameter L2 strength ``l2``:

    L(w, l2; X, y) = mean_n CE(softmax(f(w; x_n)), y_n) + sum_i l2_i w_i^2

Models
------
``MLP``       fully connected, ``h = act(h W_k + b_k)``, last layer linear; the
              same block order/initialisation as ``shared.mlp_spec.MLPSpec``
              (it *is* an MLPSpec), so given a seed both backends start from
              the same flat vector.
``DenseNet``  Huang et al., "Densely connected convolutional networks" (2016)
              for CIFAR-sized inputs; see the class docstring.

Common interface (what DrMAD / meta / training code uses)
---------------------------------------------------------
Every model has ``layout`` (``shared.layout.ParamLayout``: block names and
shapes in flat order), ``init(seed) -> float64 flat w0``, ``input_var()``,
``n_bn`` (number of batch-norm layers), ``bn_channels``, ``describe()`` and the
symbolic ``forward(blocks, X, bn_stats=None) -> (logits, batch_stats)``.

Symbolic helpers on a flat symbolic vector ``w`` (a ``theano.shared`` or a
tensor); the Hessian-vector product reverse over reverse or, with ``hvp="rop"``,
forward over reverse (``rop``: the R-operator, working around ``T.Rop``'s failures):

- ``symbolic_loss(model, w, X, y, l2)``            -> (loss, nll, batch_stats)
- ``symbolic_grad(model, w, X, y, l2)``            -> (grad_w L, nll, batch_stats)
- ``symbolic_hvp(model, w, X, y, l2, v, hvp)``          -> (H v, 2 w v)
- ``symbolic_grad_and_hvp(model, w, X, y, l2, v, hvp)`` -> (grad_w L, CE, H v, 2 w v)

  ``H v = d/dw (grad_w CE . v) + 2 l2 v``; the mixed term
  ``d(grad_w L)/d l2 ^T v = 2 w v`` is closed form.

Batch norm in all of these uses the statistics of the batch ``X`` (as the
training step did), so a validation loss built with them uses the validation
batch's statistics; ``bn_stats=`` (running averages) is for evaluation only.

Compiled helpers (compile once, keep the function):

- ``Functions(model)``: host API on flat numpy vectors, each function compiled
  on first use: ``nll, loss, grad, nll_grad, hvp, logits, predict, error``
  (batch statistics in batch-norm layers).
- ``SGDState`` + ``compile_sgd_step``: a training step with all state (weights,
  velocity, learning rate, L2, BN running averages) in shared variables; the
  only host traffic per step is the batch in and the loss out.
- ``compile_evaluate``: loss sum and error count with the BN running averages.

Gradients are taken with respect to the *block views* of the flat vector
(``w[o:o+n].reshape(shape)``) and concatenated: every path from the loss to
``w`` passes through exactly one view, so this equals the gradient with
respect to ``w`` without a chain of ``inc_subtensor`` over the full vector.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from gpu_ver import config
from shared.errors import ConfigError
from shared.layout import ParamLayout
from shared.mlp_spec import MLPSpec

theano = config.load()
T = theano.tensor
from theano.tensor.nnet import conv2d  # noqa: E402 (after config.load)
from theano.tensor.signal.pool import pool_2d  # noqa: E402

from gpu_ver import fncache  # noqa: E402
from gpu_ver.conv import conv_gemm  # noqa: E402
from gpu_ver.rop import rop  # noqa: E402

BN_EPS = 1e-5          # as torch.nn.BatchNorm2d
BN_MOMENTUM = 0.1      # running <- (1 - m) running + m batch (torch convention)

ACTIVATIONS = {
    "relu": T.nnet.relu,
    "tanh": T.tanh,
    "softplus": T.nnet.softplus,
}


# --------------------------------------------------------------------------- pieces
def floatX() -> str:
    return str(theano.config.floatX)


def split(w, layout: ParamLayout) -> list:
    """Symbolic block views ``w[o:o+n].reshape(shape)`` of a flat vector, in layout order."""
    return [w[o:o + n].reshape(s, ndim=len(s)) for o, n, s in zip(layout.offsets, layout.sizes, layout.shapes)]


def flat(blocks) -> "T.TensorVariable":
    return T.concatenate([b.flatten() for b in blocks])


def block_sums(x, layout: ParamLayout) -> "T.TensorVariable":
    """(sum_{i in block b} x_i)_b, one entry per block of ``layout``: the adjoint of expanding a
    per-block value to its parameters. Built as a join of one-element sums, which stays on a
    GPU device (a ``T.stack`` of scalars is a host ``MakeVector``, with one transfer per block)."""
    return T.concatenate([x[o:o + n].sum(keepdims=True) for o, n in zip(layout.offsets, layout.sizes)])


def log_softmax(logits):
    """log p = z - max z - log sum exp(z - max z); the max carries no gradient (it cancels exactly)."""
    m = theano.gradient.zero_grad(logits.max(axis=1, keepdims=True))
    z = logits - m
    return z - T.log(T.exp(z).sum(axis=1, keepdims=True))


def nll_per_example(logits, y):
    """-log softmax(logits)[n, y_n] for each example n, as the row sum of log softmax times
    the one-hot matrix of y. The value is the same (the other terms are exact zeros); the
    graph is elementwise ops and a sum, which a GPU device runs, where indexing by y and
    its gradient (``AdvancedIncSubtensor``) would stay on the host."""
    hot = T.eq(y.dimshuffle(0, "x"), T.arange(logits.shape[1]).dimshuffle("x", 0))
    return -(log_softmax(logits) * T.cast(hot, logits.dtype)).sum(axis=1)


def cross_entropy(logits, y):
    """Mean over the batch of -log softmax(logits)[n, y_n] (twice differentiable, unlike
    ``T.nnet.categorical_crossentropy``; docs/THEANO.md s.3)."""
    return nll_per_example(logits, y).mean()


def batch_norm(x, scale, shift, stats=None, eps=BN_EPS, axis=1):
    """Per-channel batch normalisation of a 4-d tensor with channels on ``axis``
    (1: (n, c, h, w); 3: (n, h, w, c)) (Ioffe & Szegedy 2015).

        y = scale * (x - mu) / sqrt(var + eps) + shift

    ``stats=None``: mu, var are the batch mean and (biased) variance over the
    other axes, written with ``x.mean`` so that second derivatives are right
    (``batch_normalization_train`` gets them wrong; docs/THEANO.md s.3). Otherwise
    ``stats = (mu, var)`` (running averages, for evaluation). Returns (y, (mu, var)).
    """
    others = tuple(a for a in range(4) if a != axis)
    pattern = tuple(0 if a == axis else "x" for a in range(4))
    if stats is None:
        mu = x.mean(axis=others)
        var = T.sqr(x - mu.dimshuffle(*pattern)).mean(axis=others)
    else:
        mu, var = stats
    a = scale / T.sqrt(var + eps)
    b = shift - mu * a
    return x * a.dimshuffle(*pattern) + b.dimshuffle(*pattern), (mu, var)


CONV_IMPLS = ("gemm", "corrmm")


def _check_activation(name):
    if name not in ACTIVATIONS:
        raise ConfigError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}")


# --------------------------------------------------------------------------- MLP
class MLP(MLPSpec):
    """``shared.mlp_spec.MLPSpec`` as a Theano graph: h = act(h W + b), last layer linear."""

    n_bn = 0
    bn_channels = ()

    def input_var(self, name="X"):
        return T.matrix(name)

    @property
    def input_shape(self) -> tuple:
        return (self.sizes[0],)

    def forward(self, blocks, X, bn_stats=None):
        act = ACTIVATIONS[self.activation]
        h, n = X, len(blocks) // 2
        for k in range(n):
            h = T.dot(h, blocks[2 * k]) + blocks[2 * k + 1]
            if k < n - 1:
                h = act(h)
        return h, []

    def describe(self) -> dict:
        return {"model": "mlp", "sizes": list(self.sizes), "activation": self.activation}


# --------------------------------------------------------------------------- DenseNet
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
        _check_activation(self.activation)
        if self.conv not in CONV_IMPLS:
            raise ConfigError(f"DenseNet conv must be one of {', '.join(CONV_IMPLS)}, got {self.conv!r}")

    # -- architecture as a plan (shared by layout, init and forward) ------------
    @property
    def layers_per_block(self) -> int:
        return (self.depth - 4) // (6 if self.bottleneck else 3)

    def plan(self) -> list:
        """Units in order: ('conv', name, cin, cout, ksize, hw), ('bn', name, c, hw),
        ('keep',), ('concat',), ('pool', c, hw), ('gap',), ('fc', name, cin, cout).

        A dense layer is bn, [conv1x1, bn,] conv3x3, concat; hw = (H, W) at that unit.
        """
        k = int(self.growth)
        c = 2 * k if self.bottleneck else 16
        H, W = self.input_shape[1:]
        units = [("conv", "conv0", self.input_shape[0], c, 3, (H, W))]
        for b in range(1, 4):
            for i in range(1, self.layers_per_block + 1):
                p = f"b{b}.l{i:02d}"
                units.append(("keep",))
                if self.bottleneck:
                    units += [("bn", f"{p}.bn1", c, (H, W)), ("conv", f"{p}.conv1", c, 4 * k, 1, (H, W)),
                              ("bn", f"{p}.bn2", 4 * k, (H, W)), ("conv", f"{p}.conv2", 4 * k, k, 3, (H, W))]
                else:
                    units += [("bn", f"{p}.bn", c, (H, W)), ("conv", f"{p}.conv", c, k, 3, (H, W))]
                units.append(("concat",))
                c += k
            if b < 3:
                cout = int(np.floor(self.compression * c))
                units += [("bn", f"t{b}.bn", c, (H, W)), ("conv", f"t{b}.conv", c, cout, 1, (H, W)),
                          ("pool", cout, (H, W))]
                c, H, W = cout, H // 2, W // 2
        units += [("bn", "final.bn", c, (H, W)), ("gap",), ("fc", "fc", c, int(self.n_classes))]
        return units

    @property
    def layout(self) -> ParamLayout:
        names, shapes = [], []
        for u in self.plan():
            if u[0] == "conv":
                names.append(f"{u[1]}.W")
                shapes.append((u[3], u[2], u[4], u[4]))
            elif u[0] == "bn":
                names += [f"{u[1]}.scale", f"{u[1]}.shift"]
                shapes += [(u[2],), (u[2],)]
            elif u[0] == "fc":
                names += ["fc.W", "fc.b"]
                shapes += [(u[2], u[3]), (u[3],)]
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
        return tuple(u[2] for u in self.plan() if u[0] == "bn")

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
        return T.tensor4(name)

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
            kind = u[0]
            if kind == "conv":
                _, name, cin, cout, ks, (H, W) = u
                if cnhw:
                    h = conv_gemm(h, p[f"{name}.W"], n, (H, W), cin, cout, ks)
                else:
                    h = conv2d(h, p[f"{name}.W"], input_shape=(B, cin, H, W), filter_shape=(cout, cin, ks, ks),
                               border_mode="half", filter_flip=False)
            elif kind == "bn":
                name = u[1]
                h, st = batch_norm(h, p[f"{name}.scale"], p[f"{name}.shift"],
                                   None if bn_stats is None else bn_stats[i_bn], axis=ca)
                h = act(h)
                out_stats.append(st)
                i_bn += 1
            elif kind == "keep":
                keep = h
            elif kind == "concat":
                h = T.concatenate([keep, h], axis=ca)
            elif kind == "pool":
                if cnhw:   # 2x2 average: a reshape and a mean (H, W even by construction)
                    _, c, (H, W) = u
                    h = h.reshape((c, n, H // 2, 2, W // 2, 2)).mean(axis=(3, 5))
                else:
                    h = pool_2d(h, ws=(2, 2), ignore_border=True, mode="average_inc_pad")
            elif kind == "gap":
                h = h.mean(axis=(2, 3)).T if cnhw else h.mean(axis=(2, 3))
            elif kind == "fc":
                h = T.dot(h, p["fc.W"]) + p["fc.b"]
        return h, (out_stats if bn_stats is None else [])


def densenet_param_count(depth=40, growth=12, bottleneck=False, compression=1.0, n_classes=10,
                         input_shape=(3, 32, 32)) -> int:
    """Number of trainable parameters (no graph is built)."""
    return DenseNet(depth, growth, bottleneck, compression, n_classes, input_shape).layout.size


# --------------------------------------------------------------------------- symbolic helpers
def symbolic_loss(model, w, X, y, l2, bn_stats=None):
    """(L, CE, batch_stats) for flat symbolic w; ``l2`` flat per-parameter (or scalar)."""
    blocks = split(w, model.layout)
    logits, stats = model.forward(blocks, X, bn_stats)
    nll = cross_entropy(logits, y)
    return nll + T.sum(l2 * T.sqr(w)), nll, stats


def _nll_and_blocks(model, w, X, y, with_logits=False):
    blocks = split(w, model.layout)
    logits, stats = model.forward(blocks, X, None)
    out = (cross_entropy(logits, y), blocks, stats)
    return out + (logits,) if with_logits else out


def grad(cost, wrt):
    """``T.grad`` with room for its recursion: Theano walks the graph recursively, and
    the reverse-over-reverse graph of DenseNet-40 is deeper than Python's default
    limit of 1,000 frames (Python 3.11 keeps these frames off the C stack)."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 100_000))
    try:
        return T.grad(cost, wrt)
    finally:
        sys.setrecursionlimit(old)


def symbolic_grad(model, w, X, y, l2):
    """(grad_w L, CE, batch_stats): grad_w L = grad_w CE + 2 l2 w, batch statistics in BN."""
    nll, blocks, stats = _nll_and_blocks(model, w, X, y)
    g = flat(grad(nll, blocks)) + 2 * l2 * w
    return g, nll, stats


def block_dot(a, b):
    """sum_i <a_i, b_i> over matching lists of blocks, as ONE n-ary add (a Python ``sum``
    chain is as deep as the number of blocks, and DenseNet-40 has 160 of them)."""
    return T.add(*[(ai * bi).sum() for ai, bi in zip(a, b)])


HVP_METHODS = ("ror", "rop")
DEFAULT_HVP = "ror"     # rop is equal to rounding but no faster on DenseNet-40 (docs/MEASUREMENTS.md s.3)


def check_hvp_method(hvp: str) -> str:
    """``hvp`` if it is one of ``HVP_METHODS``, else ConfigError naming it."""
    if hvp not in HVP_METHODS:
        raise ConfigError(f"Hessian-vector product must be one of {', '.join(HVP_METHODS)}, got {hvp!r}")
    return hvp


def symbolic_grad_and_hvp(model, w, X, y, l2, v, hvp=DEFAULT_HVP):
    """(grad_w L, CE, H v, 2 w v) sharing one forward and one backward pass.

    ``hvp="ror"`` (reverse over reverse): H v = grad_w (grad_w CE . v) + 2 l2 v,
    the first gradient built with its own graph so it can be differentiated again.
    ``hvp="rop"`` (forward over reverse): H v = R_v(grad_w CE) + 2 l2 v, the
    R-operator (``rop``) through the gradient's graph (Pearlmutter 1994). The two are
    the same matrix-vector product and agree to rounding (tested). 2 w v is the mixed
    term (d grad_w L / d l2)^T v (diagonal).
    """
    check_hvp_method(hvp)
    nll, blocks, _ = _nll_and_blocks(model, w, X, y)
    g = grad(nll, blocks)
    if hvp == "rop":
        hv_ce = rop(flat(g), w, v)
    else:
        hv_ce = flat(grad(block_dot(g, split(v, model.layout)), blocks))
    return flat(g) + 2 * l2 * w, nll, hv_ce + 2 * l2 * v, 2 * w * v


def symbolic_hvp(model, w, X, y, l2, v, hvp=DEFAULT_HVP):
    """(H v, 2 w v) with H = d^2 L / dw^2 (``symbolic_grad_and_hvp``'s two methods)."""
    _, _, hv, mix = symbolic_grad_and_hvp(model, w, X, y, l2, v, hvp)
    return hv, mix


# --------------------------------------------------------------------------- host API
class Functions:
    """Compiled functions of ``model`` on flat numpy vectors (float64 out).

    Each is compiled the first time it is called and kept. Batch norm uses
    batch statistics throughout (as in training and in hypergradients);
    ``logits(w, X, bn_stats)`` takes running averages for evaluation.
    ``l2`` may be a scalar or a per-parameter vector; ``hvp``: the method of ``hvp``
    (``symbolic_grad_and_hvp``).
    """

    def __init__(self, model, hvp: str = DEFAULT_HVP):
        self.model, self.hvp_method = model, check_hvp_method(hvp)
        self.fx = floatX()
        self._fns = {}

    # building -------------------------------------------------------------------------
    def _vars(self):
        return (T.vector("w"), T.vector("l2"), self.model.input_var("X"), T.lvector("y"), T.vector("v"))

    def _get(self, name):
        if name not in self._fns:
            w, l2, X, y, v = self._vars()
            m = self.model
            if name == "loss":
                L, nll, _ = symbolic_loss(m, w, X, y, l2)
                ins, outs = [w, l2, X, y], [L, nll]
            elif name == "grad":
                g, nll, _ = symbolic_grad(m, w, X, y, l2)
                ins, outs = [w, l2, X, y], [g, nll]
            elif name == "hvp":
                ins, outs = [w, l2, X, y, v], list(symbolic_hvp(m, w, X, y, l2, v, self.hvp_method))
            elif name == "logits":
                stats = [(T.vector(f"mu{i}"), T.vector(f"var{i}")) for i in range(m.n_bn)]
                logits, _ = m.forward(split(w, m.layout), X, stats if stats else None)
                ins, outs = [w, X] + [s for pair in stats for s in pair], [logits]
            elif name == "logits_batch":
                logits, _ = m.forward(split(w, m.layout), X, None)
                ins, outs = [w, X], [logits]
            else:
                raise KeyError(name)
            self._fns[name] = fncache.function(ins, outs, name=f"{type(m).__name__}.{name}")
        return self._fns[name]

    def _c(self, a):
        return np.asarray(a, dtype=self.fx)

    def _l2(self, l2):
        return np.ascontiguousarray(np.broadcast_to(self._c(l2), (self.model.layout.size,)))

    # API ------------------------------------------------------------------------------------
    def loss(self, w, l2, X, y) -> float:
        """Training objective: mean cross-entropy + sum_i l2_i w_i^2."""
        return float(self._get("loss")(self._c(w), self._l2(l2), self._c(X), np.asarray(y, np.int64))[0])

    def nll(self, w, X, y) -> float:
        return float(self._get("loss")(self._c(w), self._l2(0.0), self._c(X), np.asarray(y, np.int64))[1])

    def grad(self, w, l2, X, y) -> np.ndarray:
        """grad_w L = grad_w CE + 2 l2 w (flat, float64)."""
        return np.asarray(self._get("grad")(self._c(w), self._l2(l2), self._c(X), np.asarray(y, np.int64))[0],
                          np.float64)

    def nll_grad(self, w, X, y) -> np.ndarray:
        return self.grad(w, 0.0, X, y)

    def nll_and_grad(self, w, X, y) -> tuple:
        """(mean CE, grad_w CE) from the same compiled function as ``grad``."""
        g, nll = self._get("grad")(self._c(w), self._l2(0.0), self._c(X), np.asarray(y, np.int64))
        return float(nll), np.asarray(g, np.float64)

    def hvp(self, w, l2, X, y, v):
        """(H v, 2 w v): Hessian-vector product and the mixed term wrt l2 (float64)."""
        hv, m = self._get("hvp")(self._c(w), self._l2(l2), self._c(X), np.asarray(y, np.int64), self._c(v))
        return np.asarray(hv, np.float64), np.asarray(m, np.float64)

    def logits(self, w, X, bn_stats=None) -> np.ndarray:
        """Logits; BN uses ``bn_stats`` [(mean, var), ...] when given, else batch statistics."""
        if bn_stats is None or self.model.n_bn == 0:
            return np.asarray(self._get("logits_batch")(self._c(w), self._c(X))[0], np.float64)
        flat_stats = [self._c(a) for pair in bn_stats for a in pair]
        return np.asarray(self._get("logits")(self._c(w), self._c(X), *flat_stats)[0], np.float64)

    def predict(self, w, X, bn_stats=None) -> np.ndarray:
        return np.argmax(self.logits(w, X, bn_stats), axis=1)

    def error(self, w, X, y, bn_stats=None) -> float:
        return float(np.mean(self.predict(w, X, bn_stats) != np.asarray(y)))


# --------------------------------------------------------------------------- training state
class SGDState:
    """Shared variables of SGD training: weights ``w``, velocity ``v``, learning rate ``lr``,
    per-parameter ``l2`` and BN running averages ``bn`` [(mean, var), ...].

    Running averages follow torch: ``r <- (1 - 0.1) r + 0.1 s`` with the batch
    mean, and the *unbiased* batch variance (n / (n - 1), n = batch * H * W);
    they start at mean 0, var 1, are used only for evaluation
    (``compile_evaluate``), and never enter gradients or hypergradients.
    """

    def __init__(self, model, w0, lr=0.1, l2=0.0, host=False):
        """``host``: keep the state in host memory even on a GPU device (for comparing a
        step compiled for the device with the same step on the C backend)."""
        fx = floatX()
        size = model.layout.size
        shared = theano.tensor._shared if host else theano.shared
        self.model = model
        self.w = shared(np.asarray(w0, fx), name="w")
        self.v = shared(np.zeros(size, fx), name="v")
        self.lr = shared(np.asarray(lr, fx), name="lr")
        self.l2 = shared(np.ascontiguousarray(np.broadcast_to(np.asarray(l2, fx), (size,))), name="l2")
        self.bn = [(shared(np.zeros(c, fx), name=f"bn{i}.mean"),
                    shared(np.ones(c, fx), name=f"bn{i}.var"))
                   for i, c in enumerate(model.bn_channels)]

    def get_arrays(self) -> dict:
        """All state as float64 numpy arrays (for checkpoints)."""
        out = {"w": self.w.get_value(), "v": self.v.get_value(), "l2": self.l2.get_value()}
        for i, (m, s) in enumerate(self.bn):
            out[f"bn{i}.mean"], out[f"bn{i}.var"] = m.get_value(), s.get_value()
        return {k: np.asarray(a) for k, a in out.items()}

    def set_arrays(self, arrays: dict) -> None:
        fx = floatX()
        need = ["w", "v", "l2"] + [f"bn{i}.{s}" for i in range(len(self.bn)) for s in ("mean", "var")]
        missing = [k for k in need if k not in arrays]
        if missing:
            raise ConfigError(f"checkpoint lacks arrays {missing[:4]}{'...' if len(missing) > 4 else ''}")
        for k, var in [("w", self.w), ("v", self.v), ("l2", self.l2)] + \
                [(f"bn{i}.{s}", x) for i, pair in enumerate(self.bn) for s, x in zip(("mean", "var"), pair)]:
            a = np.asarray(arrays[k])
            if a.shape != var.get_value(borrow=True).shape:
                raise ConfigError(f"checkpoint array {k} has shape {a.shape}, the model needs "
                                  f"{var.get_value(borrow=True).shape}")
            var.set_value(a.astype(fx))

    def bn_values(self) -> list:
        return [(m.get_value(), s.get_value()) for m, s in self.bn]


def compile_sgd_step(state: SGDState, momentum=0.9, nesterov=True, bn_momentum=BN_MOMENTUM, mode=None):
    """``step(X, y) -> [loss, nll, n_errors]`` updating ``state`` in place (one Theano call).
    ``mode``: a Theano compile mode (then the function cache is not used).

    g = grad_w CE + 2 l2 w;  v <- mu v + g;
    w <- w - lr (g + mu v_new)  (Nesterov, torch/Sutskever form)  or  w - lr v_new.
    With l2 = wd / 2 this is torch's SGD with weight decay wd. BN running
    averages are updated from the batch statistics (see ``SGDState``).
    Outputs are computed at the pre-update weights.
    """
    m = state.model
    X, y = m.input_var("X"), T.lvector("y")
    w, v, lr, l2 = state.w, state.v, state.lr, state.l2
    nll, blocks, stats, logits = _nll_and_blocks(m, w, X, y, with_logits=True)
    g = flat(grad(nll, blocks)) + 2 * l2 * w
    loss = nll + T.sum(l2 * T.sqr(w))
    v_new = momentum * v + g
    w_new = w - lr * (g + momentum * v_new) if nesterov else w - lr * v_new
    updates = [(v, v_new), (w, w_new)]
    for (rm, rv), (mu, var), (_, _, H, W) in zip(state.bn, stats, _bn_shapes(m)):
        n = X.shape[0] * H * W
        unbiased = var * T.cast(n, var.dtype) / T.cast(n - 1, var.dtype)
        updates += [(rm, (1 - bn_momentum) * rm + bn_momentum * mu),
                    (rv, (1 - bn_momentum) * rv + bn_momentum * unbiased)]
    n_err = T.neq(T.argmax(logits, axis=1), y).sum()
    return fncache.function([X, y], [loss, nll, n_err], updates=updates, name="sgd_step", mode=mode)


def _bn_shapes(model):
    return [(None, u[2], *u[3]) for u in model.plan() if u[0] == "bn"] if model.n_bn else []


def compile_evaluate(state: SGDState, model=None):
    """``evaluate(X, y) -> [CE per example, error (0/1) per example]`` at ``state.w`` with the
    BN running averages. ``model``: the same architecture with another static batch size
    (default ``state.model``); with running averages every example is independent, so a
    short last batch may be padded and the padding's outputs dropped.
    """
    m = state.model if model is None else model
    if m.layout != state.model.layout:
        raise ConfigError("compile_evaluate: the model's parameter layout differs from the state's")
    X, y = m.input_var("X"), T.lvector("y")
    logits, _ = m.forward(split(state.w, m.layout), X, state.bn if m.n_bn else None)
    ce = nll_per_example(logits, y)
    err = T.neq(T.argmax(logits, axis=1), y)
    return fncache.function([X, y], [ce, err], name="evaluate")


def with_batch_size(model, batch_size):
    """The same model with ``batch_size`` given to the convolutions as a static shape.

    Static shapes keep Theano's graph optimiser fast: DenseNet-16's gradient
    optimised in 93 s with a static batch and did not finish in 300 s without
    (measured here, 2 loaded cores). An MLP is returned unchanged.
    """
    if isinstance(model, DenseNet):
        from dataclasses import replace  # noqa: PLC0415
        return replace(model, batch_size=None if batch_size is None else int(batch_size))
    return model
