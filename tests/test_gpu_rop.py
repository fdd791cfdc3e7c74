"""gpu_ver.rop: the Hessian-vector product forward over reverse (hvp="rop") equals the one
reverse over reverse (hvp="ror") to rounding and a central finite difference of the gradient,
on the MLP (fast) and on the small DenseNet with batch norm of the check command (slow: two
cold compiles of its second-order graph, about 4 minutes on 2 cores).

Tolerances (float64, unit roundoff u = 2^-53):

- rop vs ror: the two graphs compute the same sums in different orders. Each entry of
  H v = sum_j H_ij v_j sums (at most) P products, each itself a chain of rounded products
  through the network; with rounding errors of random sign the sum's error grows as
  sqrt(P) u relative to the largest term, so the test allows 16 sqrt(P) u of max|H v|
  (16 for the chain's length and the cancellation between terms; the measured ratio is
  1e-16 on the MLP and 9e-16 on the DenseNet, below u sqrt(P) in both).
- the gradient and the mixed term 2 w v are the same graph in both: equal bit for bit.
- finite differences: (g(w + h v) - g(w - h v)) / 2h has truncation h^2 |g'''| / 6 and
  rounding u |g| / h; with h = 1e-5 both are below 1e-6 of |H v| here (as in
  tests/test_gpu_models.py).
"""
import numpy as np
import pytest

from gpu_ver import config

theano = config.load(device="cpu", floatX="float64")

from gpu_ver import fdcheck as GC  # noqa: E402
from gpu_ver import models as M  # noqa: E402
from shared.errors import ConfigError  # noqa: E402

U = 2.0 ** -53
T = M.tt  # theano.tensor


def rel(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def compiled(net, hvp):
    """(w, l2, X, y, v) -> (grad_w L, CE, H v, 2 w v) with the given HVP method."""
    w, l2, v = T.vector("w"), T.vector("l2"), T.vector("v")
    X, y = net.input_var("X"), T.lvector("y")
    return theano.function([w, l2, X, y, v], list(M.symbolic_grad_and_hvp(net, w, X, y, l2, v, hvp)))


def agree(net, X, y, seed):
    rng = np.random.default_rng(seed)
    w = net.init(0) + 0.1 * rng.standard_normal(net.layout.size)     # BN scales/shifts off 1/0
    l2 = np.exp(rng.uniform(-7, -4, w.size))
    v = rng.standard_normal(w.size)
    f_rop, f_ror = compiled(net, "rop"), compiled(net, "ror")
    g, nll, hv, mix = (np.asarray(a) for a in f_rop(w, l2, X, y, v))
    g2, nll2, hv2, mix2 = (np.asarray(a) for a in f_ror(w, l2, X, y, v))
    P = w.size
    assert rel(hv, hv2) <= 16 * np.sqrt(P) * U
    assert np.array_equal(mix, mix2) and np.array_equal(mix, 2 * w * v)
    assert rel(g, g2) <= 16 * np.sqrt(P) * U and nll == pytest.approx(float(nll2), rel=64 * U)
    h = 1e-5
    fd = (f_rop(w + h * v, l2, X, y, v)[0] - f_rop(w - h * v, l2, X, y, v)[0]) / (2 * h)
    assert rel(hv, fd) < 1e-6
    # and the test can fail: the HVP along another direction is far from this one
    assert rel(f_rop(w, l2, X, y, v[::-1].copy())[2], fd) > 1e-3


def test_mlp_rop_equals_ror_and_finite_differences():
    rng = np.random.default_rng(0)
    net = M.MLP((12, 7, 5, 4), "tanh")
    agree(net, rng.standard_normal((30, 12)), rng.integers(0, 4, 30), seed=1)


@pytest.mark.slow   # two cold compiles of the DenseNet's second-order graph (ror alone ~150 s on 2 cores)
def test_densenet_rop_equals_ror_and_finite_differences():
    """The check command's DenseNet: depth 7, growth 4, softplus, 8x8, batch norm with
    batch statistics, 4 classes."""
    problem, _ = GC.densenet_problem(0, T=1)
    X, y = problem.batch(0)
    agree(problem.model, X, y, seed=2)


def test_unknown_hvp_method_is_config_error():
    net = M.MLP((3, 2), "tanh")
    w, l2, v = T.vector("w"), T.vector("l2"), T.vector("v")
    with pytest.raises(ConfigError, match="'fwd'"):
        M.symbolic_grad_and_hvp(net, w, net.input_var("X"), T.lvector("y"), l2, v, "fwd")


def test_command_line_choices_are_the_models_methods():
    """``--hvp`` (gpu_ver drmad, hypergrad, check) is parsed without Theano: its choices and
    default are gpu_ver.meta's copies of the models' constants."""
    from gpu_ver.cli import problem as meta  # noqa: PLC0415

    assert meta.HVP_CHOICES == M.HVP_METHODS and meta.HVP_DEFAULT == M.DEFAULT_HVP
