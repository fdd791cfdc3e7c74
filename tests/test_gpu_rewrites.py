"""gpu_ver/rewrites.py: sums over leading or trailing axes compile to a product with ones, same values,
same first and second derivatives."""
import numpy as np
import pytest

from gpu_ver import config

theano = config.load(device="cpu", floatX="float64")
T = theano.tensor


def _op_names(f):
    return [type(n.op).__name__ for n in f.maker.fgraph.toposort()]


@pytest.mark.parametrize("axis,rewritten", [((0, 1, 2), True), ((0,), True), ((0, 1), True),
                                            ((1, 2, 3), True), ((3,), True), ((1, 2), False),
                                            ((0, 2), False), (None, False)])
def test_sum_over_outer_axes_becomes_a_product(axis, rewritten):
    x = T.tensor4("x")
    f = theano.function([x], x.sum(axis=axis))
    xv = np.random.default_rng(0).standard_normal((3, 4, 5, 6))
    assert np.allclose(f(xv), xv.sum(axis=axis), rtol=1e-13, atol=1e-13)
    assert ("Sum" not in _op_names(f)) == rewritten


def test_batchnorm_like_graph_second_derivative_unchanged():
    """d^2/dx^2 of a per-channel normalisation, checked against finite differences of
    the compiled gradient (the graph has sums over (0, 1, 2) in value, gradient and HVP)."""
    x, v = T.tensor4("x"), T.tensor4("v")
    mu = x.mean(axis=(0, 1, 2))
    var = T.sqr(x - mu).mean(axis=(0, 1, 2))
    y = (x - mu) / T.sqrt(var + 1e-3)
    loss = T.sum(T.tanh(y) * T.arange(y.size).reshape(y.shape) / y.size)
    g = T.grad(loss, x)
    hv = T.grad(T.sum(g * v), x)
    f_g, f_hv = theano.function([x], g), theano.function([x, v], hv)
    assert "CGemv" in _op_names(f_hv)                 # the rewrite took part
    rng = np.random.default_rng(1)
    xv, vv = rng.standard_normal((2, 3, 3, 4)), rng.standard_normal((2, 3, 3, 4))
    h = 1e-5
    fd = (f_g(xv + h * vv) - f_g(xv - h * vv)) / (2 * h)
    got = f_hv(xv, vv)
    assert np.max(np.abs(got - fd)) <= 1e-6 * np.max(np.abs(fd))
