"""Symbolic building blocks shared by the models: views of the flat parameter
vector, log-softmax cross-entropy, batch normalisation and its running
averages, and gradients taken with room for Theano's recursion.

All take and return Theano variables; ``gpu_ver.models`` composes them into
the MLP and DenseNet objectives. ``tt`` is ``theano.tensor`` (``T`` is kept
for the number of training steps, as in the papers).
"""
from __future__ import annotations

import sys

from gpu_ver import config
from shared.errors import ConfigError
from shared.layout import ParamLayout

theano = config.load()
tt = theano.tensor

BN_EPS = 1e-5          # as torch.nn.BatchNorm2d
BN_MOMENTUM = 0.1      # running <- (1 - m) running + m batch (torch convention)

ACTIVATIONS = {
    "relu": tt.nnet.relu,
    "tanh": tt.tanh,
    "softplus": tt.nnet.softplus,
}


# --------------------------------------------------------------------------- pieces
def floatX() -> str:
    return str(theano.config.floatX)


def split(w, layout: ParamLayout) -> list:
    """Symbolic block views ``w[o:o+n].reshape(shape)`` of a flat vector, in layout order."""
    return [w[o:o + n].reshape(s, ndim=len(s)) for o, n, s in zip(layout.offsets, layout.sizes, layout.shapes)]


def flat(blocks) -> "tt.TensorVariable":
    return tt.concatenate([b.flatten() for b in blocks])


def block_sums(x, layout: ParamLayout) -> "tt.TensorVariable":
    """(sum_{i in block b} x_i)_b, one entry per block of ``layout``: the adjoint of expanding a
    per-block value to its parameters. Built as a join of one-element sums, which stays on a
    GPU device (a ``tt.stack`` of scalars is a host ``MakeVector``, with one transfer per block)."""
    return tt.concatenate([x[o:o + n].sum(keepdims=True) for o, n in zip(layout.offsets, layout.sizes)])


def log_softmax(logits):
    """log p = z - max z - log sum exp(z - max z); the max carries no gradient (it cancels exactly)."""
    m = theano.gradient.zero_grad(logits.max(axis=1, keepdims=True))
    z = logits - m
    return z - tt.log(tt.exp(z).sum(axis=1, keepdims=True))


def nll_per_example(logits, y):
    """-log softmax(logits)[n, y_n] for each example n, as the row sum of log softmax times
    the one-hot matrix of y. The value is the same (the other terms are exact zeros); the
    graph is elementwise ops and a sum, which a GPU device runs, where indexing by y and
    its gradient (``AdvancedIncSubtensor``) would stay on the host."""
    hot = tt.eq(y.dimshuffle(0, "x"), tt.arange(logits.shape[1]).dimshuffle("x", 0))
    return -(log_softmax(logits) * tt.cast(hot, logits.dtype)).sum(axis=1)


def cross_entropy(logits, y):
    """Mean over the batch of -log softmax(logits)[n, y_n] (twice differentiable, unlike
    ``tt.nnet.categorical_crossentropy``; docs/THEANO.md s.3)."""
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
        var = tt.sqr(x - mu.dimshuffle(*pattern)).mean(axis=others)
    else:
        mu, var = stats
    a = scale / tt.sqrt(var + eps)
    b = shift - mu * a
    return x * a.dimshuffle(*pattern) + b.dimshuffle(*pattern), (mu, var)


def bn_running_update(running, batch, count, momentum=BN_MOMENTUM):
    """Updates of one batch-norm layer's running averages (torch's convention):

        r_mean <- (1 - m) r_mean + m mu,   r_var <- (1 - m) r_var + m var n / (n - 1)

    with the batch mean ``mu`` and biased variance ``var`` (``batch_norm``'s
    statistics) over ``n = count`` values per channel (batch size times H times W),
    so the variance averaged is the unbiased one; ``m = momentum``.
    ``running = (r_mean, r_var)`` shared variables, ``batch = (mu, var)``.
    Returns ``[(r_mean, new), (r_var, new)]`` for ``theano.function(updates=...)``.
    """
    rm, rv = running
    mu, var = batch
    unbiased = var * tt.cast(count, var.dtype) / tt.cast(count - 1, var.dtype)
    return [(rm, (1 - momentum) * rm + momentum * mu),
            (rv, (1 - momentum) * rv + momentum * unbiased)]


def check_activation(name):
    if name not in ACTIVATIONS:
        raise ConfigError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}")


def grad(cost, wrt):
    """``tt.grad`` with room for its recursion: Theano walks the graph recursively, and
    the reverse-over-reverse graph of DenseNet-40 is deeper than Python's default
    limit of 1,000 frames (Python 3.11 keeps these frames off the C stack)."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 100_000))
    try:
        return tt.grad(cost, wrt)
    finally:
        sys.setrecursionlimit(old)


def block_dot(a, b):
    """sum_i <a_i, b_i> over matching lists of blocks, as ONE n-ary add (a Python ``sum``
    chain is as deep as the number of blocks, and DenseNet-40 has 160 of them)."""
    return tt.add(*[(ai * bi).sum() for ai, bi in zip(a, b)])
