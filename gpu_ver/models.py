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
forward over reverse (``rop``: the R-operator, working around ``tt.Rop``'s failures):

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

Module map: ``gpu_ver.layers`` (views of the flat vector, cross-entropy, batch
norm and its running averages), ``gpu_ver.densenet`` (the DenseNet plan and
graph); this module composes them and re-exports their public names.

Gradients are taken with respect to the *block views* of the flat vector
(``w[o:o+n].reshape(shape)``) and concatenated: every path from the loss to
``w`` passes through exactly one view, so this equals the gradient with
respect to ``w`` without a chain of ``inc_subtensor`` over the full vector.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from gpu_ver import fncache
from gpu_ver.densenet import (CONV_IMPLS, GLOBAL_POOL, KEEP, CONCAT, BatchNorm, Concat, Conv,  # noqa: F401
                              Dense, DenseNet, GlobalPool, Keep, Pool, densenet_param_count)
from gpu_ver.layers import (ACTIVATIONS, BN_EPS, BN_MOMENTUM, batch_norm, block_dot, block_sums,  # noqa: F401
                            bn_running_update, check_activation, cross_entropy, flat, floatX, grad,
                            log_softmax, nll_per_example, split, theano, tt)
from gpu_ver.rop import rop
from shared.errors import ConfigError
from shared.mlp_spec import MLPSpec


# --------------------------------------------------------------------------- MLP
class MLP(MLPSpec):
    """``shared.mlp_spec.MLPSpec`` as a Theano graph: h = act(h W + b), last layer linear."""

    n_bn = 0
    bn_channels = ()

    def input_var(self, name="X"):
        return tt.matrix(name)

    @property
    def input_shape(self) -> tuple:
        return (self.sizes[0],)

    def forward(self, blocks, X, bn_stats=None):
        act = ACTIVATIONS[self.activation]
        h, n = X, len(blocks) // 2
        for k in range(n):
            h = tt.dot(h, blocks[2 * k]) + blocks[2 * k + 1]
            if k < n - 1:
                h = act(h)
        return h, []

    def describe(self) -> dict:
        return {"model": "mlp", "sizes": list(self.sizes), "activation": self.activation}


# --------------------------------------------------------------------------- symbolic helpers
def symbolic_loss(model, w, X, y, l2, bn_stats=None):
    """(L, CE, batch_stats) for flat symbolic w; ``l2`` flat per-parameter (or scalar)."""
    blocks = split(w, model.layout)
    logits, stats = model.forward(blocks, X, bn_stats)
    nll = cross_entropy(logits, y)
    return nll + tt.sum(l2 * tt.sqr(w)), nll, stats


def _nll_and_blocks(model, w, X, y, with_logits=False):
    blocks = split(w, model.layout)
    logits, stats = model.forward(blocks, X, None)
    out = (cross_entropy(logits, y), blocks, stats)
    return out + (logits,) if with_logits else out


def symbolic_grad(model, w, X, y, l2):
    """(grad_w L, CE, batch_stats): grad_w L = grad_w CE + 2 l2 w, batch statistics in BN."""
    nll, blocks, stats = _nll_and_blocks(model, w, X, y)
    g = flat(grad(nll, blocks)) + 2 * l2 * w
    return g, nll, stats


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
        return (tt.vector("w"), tt.vector("l2"), self.model.input_var("X"), tt.lvector("y"), tt.vector("v"))

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
                stats = [(tt.vector(f"mu{i}"), tt.vector(f"var{i}")) for i in range(m.n_bn)]
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
    X, y = m.input_var("X"), tt.lvector("y")
    w, v, lr, l2 = state.w, state.v, state.lr, state.l2
    nll, blocks, stats, logits = _nll_and_blocks(m, w, X, y, with_logits=True)
    g = flat(grad(nll, blocks)) + 2 * l2 * w
    loss = nll + tt.sum(l2 * tt.sqr(w))
    v_new = momentum * v + g
    w_new = w - lr * (g + momentum * v_new) if nesterov else w - lr * v_new
    updates = [(v, v_new), (w, w_new)]
    updates += bn_running_updates(m, state.bn, stats, X.shape[0], bn_momentum)
    n_err = tt.neq(tt.argmax(logits, axis=1), y).sum()
    return fncache.function([X, y], [loss, nll, n_err], updates=updates, name="sgd_step", mode=mode)


def bn_running_updates(model, running, batch_stats, batch_size, momentum=BN_MOMENTUM) -> list:
    """Updates of all of ``model``'s batch-norm running averages after one batch:
    ``bn_running_update`` (r <- (1 - m) r + m s, the variance made unbiased with
    n = batch_size * H * W) for each BN layer, with (H, W) from the model's plan.

    ``running``: [(r_mean, r_var), ...] shared variables; ``batch_stats``: the
    [(mu, var), ...] that ``forward(..., bn_stats=None)`` returned; ``batch_size``:
    symbolic or int. An MLP (no BN) gives ``[]``.
    """
    if not model.n_bn:
        return []
    out = []
    for pair, stats, u in zip(running, batch_stats, model.bn_units()):
        H, W = u.hw
        out += bn_running_update(pair, stats, batch_size * H * W, momentum)
    return out


def compile_evaluate(state: SGDState, model=None):
    """``evaluate(X, y) -> [CE per example, error (0/1) per example]`` at ``state.w`` with the
    BN running averages. ``model``: the same architecture with another static batch size
    (default ``state.model``); with running averages every example is independent, so a
    short last batch may be padded and the padding's outputs dropped.
    """
    m = state.model if model is None else model
    if m.layout != state.model.layout:
        raise ConfigError("compile_evaluate: the model's parameter layout differs from the state's")
    X, y = m.input_var("X"), tt.lvector("y")
    logits, _ = m.forward(split(state.w, m.layout), X, state.bn if m.n_bn else None)
    ce = nll_per_example(logits, y)
    err = tt.neq(tt.argmax(logits, axis=1), y)
    return fncache.function([X, y], [ce, err], name="evaluate")


def with_batch_size(model, batch_size):
    """The same model with ``batch_size`` given to the convolutions as a static shape.

    Static shapes keep Theano's graph optimiser fast: DenseNet-16's gradient
    optimised in 93 s with a static batch and did not finish in 300 s without
    (measured here, 2 loaded cores). An MLP is returned unchanged.
    """
    if isinstance(model, DenseNet):
        return replace(model, batch_size=None if batch_size is None else int(batch_size))
    return model
