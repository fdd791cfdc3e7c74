"""MLP and logistic-regression losses on a flat parameter vector (autograd).

The training objective of every method in this backend is

    L(w, lambda; X, y) = mean_n CE(softmax(f(w; x_n)), y_n) + sum_i lambda_i w_i^2

with a per-parameter L2 strength ``lambda`` (per block or scalar strengths are
expanded to per parameter by the hyperparameter container). ``f`` is an MLP
with tanh, relu or softplus hidden layers; an MLP without hidden layers is
logistic regression.

Inside the traced functions the parameters are a list of block arrays
(``W0, b0, W1, b1, ...``): slicing a flat vector inside an autograd trace was
measured about 2x slower (docs/DESIGN.md s.6). The flat vector exists only at the
boundary (``ParamLayout.flatten``/``unflatten``).

The second-order quantities that reverse-mode hypergradients need come from ONE
vector-Jacobian product of the data-term gradient per call (``hvp``); the L2
term's contributions are closed form: d/dw (2 lambda w) . v = 2 lambda v and
d/dlambda (2 lambda w) . v = 2 w v.
"""
from __future__ import annotations

import autograd.numpy as anp
import numpy as np
from autograd import grad as _grad
from autograd import make_vjp
from autograd.extend import defvjp, primitive
from autograd.tracer import getval

from shared.mlp_spec import MLPSpec, parse_layers  # noqa: F401 (re-exported)

@primitive
def _tanh(x):
    return np.tanh(x)


# d tanh = 1 - tanh^2 written with products only, so that the gradient evaluated inside a
# nested (second-order) trace is bit-identical to the plain gradient: exact reversal needs it.
defvjp(_tanh, lambda ans, x: lambda g: g * (1.0 - ans * ans))

ACTIVATIONS = {  # must cover shared.mlp_spec.ACTIVATION_NAMES
    "tanh": _tanh,
    "relu": lambda x: anp.maximum(x, 0.0),
    "softplus": lambda x: anp.logaddexp(0.0, x),
}


def _forward(params, X, activation):
    act = ACTIVATIONS[activation]
    h = X
    n_layers = len(params) // 2
    for k in range(n_layers):
        W, b = params[2 * k], params[2 * k + 1]
        h = anp.dot(h, W) + b
        if k < n_layers - 1:
            h = act(h)
    return h


def _nll(params, X, y, activation):
    """Mean cross-entropy of softmax(f(X)) with integer labels y."""
    logits = _forward(params, X, activation)
    # log-softmax with the max subtracted (the max is a constant shift: its gradient cancels,
    # so it is taken outside the trace); written without scipy so that cpu_ver runs where
    # scipy is absent (the GPU bundle).
    shifted = logits - np.max(getval(logits), axis=1, keepdims=True)
    logp = shifted - anp.log(anp.sum(anp.exp(shifted), axis=1, keepdims=True))
    return -anp.mean(logp[np.arange(len(y)), y])


_nll_grad = _grad(_nll)


class MLP(MLPSpec):
    """An ``MLPSpec`` with autograd losses, gradients and Hessian-vector products."""

    # --- losses on flat vectors -------------------------------------------------
    def nll(self, w, X, y) -> float:
        return float(_nll(self.layout.unflatten(w), X, y, self.activation))

    def loss(self, w, l2, X, y) -> float:
        """Training objective: mean cross-entropy + sum_i l2_i w_i^2."""
        return self.nll(w, X, y) + float(np.sum(l2 * w * w))

    def grad(self, w, l2, X, y) -> np.ndarray:
        """grad_w L = grad_w CE + 2 l2 w (flat). Deterministic for fixed inputs."""
        g = _nll_grad(self.layout.unflatten(w), X, y, self.activation)
        return np.concatenate([gi.ravel() for gi in g]) + 2.0 * l2 * w

    def nll_grad(self, w, X, y) -> np.ndarray:
        """Gradient of the mean cross-entropy alone (validation objective)."""
        g = _nll_grad(self.layout.unflatten(w), X, y, self.activation)
        return np.concatenate([gi.ravel() for gi in g])

    def hvp(self, w, l2, X, y, v):
        """One VJP of grad_w L with respect to (w, l2) against the vector v.

        Returns ``(H v, M^T v)`` where ``H = d grad_w L / dw`` (the Hessian, symmetric)
        and ``M = d grad_w L / d l2`` (diagonal 2 w), i.e. ``M^T v = 2 w v``.
        """
        layout = self.layout
        vjp, _ = make_vjp(lambda p: _nll_grad(p, X, y, self.activation))(layout.unflatten(w))
        hv = vjp(layout.unflatten(v))
        return np.concatenate([h.ravel() for h in hv]) + 2.0 * l2 * v, 2.0 * w * v

    def grad_and_hvp_fn(self, w, l2, X, y):
        """``(grad_w L, v -> (H v, M^T v))`` sharing one forward/backward pass.

        The gradient is the VJP's forward value, bit-identical to ``grad`` (tested), so
        exact reversal can use it; the closure is one VJP of the data-term gradient plus
        the closed-form L2 terms 2 l2 v and 2 w v.
        """
        layout = self.layout
        vjp, g = make_vjp(lambda p: _nll_grad(p, X, y, self.activation))(layout.unflatten(w))

        def hvp(v):
            hv = vjp(layout.unflatten(v))
            return np.concatenate([h.ravel() for h in hv]) + 2.0 * l2 * v, 2.0 * w * v

        return np.concatenate([gi.ravel() for gi in g]) + 2.0 * l2 * w, hvp

    def grad_and_hvp(self, w, l2, X, y, v):
        """``(grad_w L, H v, M^T v)`` from one VJP of the gradient (see ``grad_and_hvp_fn``)."""
        g, hvp = self.grad_and_hvp_fn(w, l2, X, y)
        return (g, *hvp(v))

    def predict(self, w, X) -> np.ndarray:
        return np.argmax(_forward(self.layout.unflatten(w), X, self.activation), axis=1)

    def error(self, w, X, y) -> float:
        """Classification error rate."""
        return float(np.mean(self.predict(w, X) != y))
