"""gpu_ver.models: MLP equals cpu_ver's MLP; DenseNet size, depth rule, HVP vs finite differences."""
import numpy as np
import pytest

from gpu_ver import config

config.load(device="cpu", floatX="float64")

from cpu_ver import models as cpu_models  # noqa: E402  (the reference; tests may import it)
from gpu_ver import models as M  # noqa: E402
from shared.errors import ConfigError  # noqa: E402


def rel(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.mark.parametrize("activation", ["tanh", "relu", "softplus"])
def test_mlp_matches_cpu_ver(activation):
    sizes = (12, 7, 5, 4)
    ref = cpu_models.MLP(sizes, activation)
    gm = M.MLP(sizes, activation)
    assert gm.layout == ref.layout
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((30, 12)), rng.integers(0, 4, 30)
    w = ref.init(3)
    assert np.array_equal(gm.init(3), w)
    l2 = np.exp(rng.standard_normal(w.size)) * 1e-2
    v = rng.standard_normal(w.size)
    f = M.Functions(gm)
    assert rel(f.loss(w, l2, X, y), ref.loss(w, l2, X, y)) < 1e-12
    assert rel(f.nll(w, X, y), ref.nll(w, X, y)) < 1e-12
    assert rel(f.grad(w, l2, X, y), ref.grad(w, l2, X, y)) < 1e-12
    hv, mix = f.hvp(w, l2, X, y, v)
    hv_ref, mix_ref = ref.hvp(w, l2, X, y, v)
    assert rel(hv, hv_ref) < 1e-12
    assert rel(mix, mix_ref) < 1e-12
    assert np.array_equal(f.predict(w, X), ref.predict(w, X))


def test_densenet40_parameter_count():
    assert M.DenseNet(depth=40, growth=12).layout.size == 1_019_722
    assert M.densenet_param_count(40, 12) == 1_019_722


def test_densenet_bad_depth_is_config_error():
    with pytest.raises(ConfigError, match="41"):
        M.DenseNet(depth=41)
    with pytest.raises(ConfigError, match="depth 13 .*6n"):
        M.DenseNet(depth=13, bottleneck=True)     # 3n + 4 but not 6n + 4
    with pytest.raises(ConfigError, match="input shape"):
        M.DenseNet(depth=7, input_shape=(3, 10, 10))


def test_densenet_layout_names_and_kinds():
    net = M.DenseNet(depth=10, growth=4, bottleneck=True, compression=0.5, input_shape=(3, 8, 8))
    lay = net.layout
    assert lay.names[0] == "conv0.W" and lay.shapes[0] == (8, 3, 3, 3)    # 2k maps with bottleneck
    assert "b1.l01.conv1.W" in lay.names and lay.names[-2:] == ("fc.W", "fc.b")
    assert set(net.block_kinds()) == {"conv", "bn_scale", "bn_shift", "fc_W", "fc_b"}
    assert net.n_bn == sum(n.endswith(".scale") for n in lay.names)
    # compression: transition 1 maps 8 + 4 = 12 channels to 6
    assert lay.shapes[lay.index("t1.conv.W")] == (6, 12, 1, 1)


def test_densenet_gemm_convolution_equals_theano_conv2d():
    """conv="gemm" (channel-major, one product + shifted sums) and conv="corrmm" (Theano's
    conv2d) are the same function of the same parameters: loss, gradient, logits with
    running statistics. (Bottleneck + compression: 3x3 and 1x1 convolutions, pooling.
    The HVP through the gemm graph is checked against finite differences below.)"""
    kw = dict(depth=10, growth=2, bottleneck=True, compression=0.5)
    nets = [M.DenseNet(input_shape=(3, 8, 8), n_classes=4, conv=c, **kw) for c in ("gemm", "corrmm")]
    assert nets[0].layout == nets[1].layout
    rng = np.random.default_rng(5)
    X, y = rng.standard_normal((5, 3, 8, 8)), rng.integers(0, 4, 5)
    w = nets[0].init(0) + 0.05 * rng.standard_normal(nets[0].layout.size)
    l2 = np.full(w.size, 1e-3)
    f_g, f_c = (M.Functions(n) for n in nets)
    assert rel(f_g.loss(w, l2, X, y), f_c.loss(w, l2, X, y)) < 1e-13
    assert rel(f_g.grad(w, l2, X, y), f_c.grad(w, l2, X, y)) < 1e-12
    stats = [(rng.standard_normal(c), 1 + rng.random(c)) for c in nets[0].bn_channels]
    assert rel(f_g.logits(w, X, stats), f_c.logits(w, X, stats)) < 1e-13
    with pytest.raises(ConfigError, match="conv"):
        M.DenseNet(depth=7, conv="fft")


@pytest.fixture(scope="module")
def tiny_net():
    net = M.DenseNet(depth=7, growth=3, input_shape=(3, 8, 8), activation="softplus", n_classes=4)
    return net, M.Functions(net)


def test_densenet_hvp_matches_finite_differences(tiny_net):
    """H v = (g(w + h v) - g(w - h v)) / 2h, batch norm with batch statistics, float64."""
    net, f = tiny_net
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((6, 3, 8, 8)), rng.integers(0, 4, 6)
    w = net.init(0)
    w += 0.1 * rng.standard_normal(w.size)        # move BN scale/shift off 1/0
    l2 = np.full(w.size, 1e-3)
    v = rng.standard_normal(w.size)
    hv, mix = f.hvp(w, l2, X, y, v)
    h = 1e-5
    fd = (f.grad(w + h * v, l2, X, y) - f.grad(w - h * v, l2, X, y)) / (2 * h)
    assert rel(hv, fd) < 1e-6
    assert np.allclose(mix, 2 * w * v)
    # gradient vs finite differences of the loss along v
    gfd = (f.loss(w + h * v, l2, X, y) - f.loss(w - h * v, l2, X, y)) / (2 * h)
    assert abs(f.grad(w, l2, X, y) @ v - gfd) < 1e-7 * max(1.0, abs(gfd))


def test_densenet_eval_with_running_stats(tiny_net):
    net, f = tiny_net
    rng = np.random.default_rng(2)
    X = rng.standard_normal((5, 3, 8, 8))
    w = net.init(1)
    stats = [(np.zeros(c), np.ones(c)) for c in net.bn_channels]
    a = f.logits(w, X, stats)
    b = f.logits(w, X)                     # batch statistics
    assert a.shape == b.shape == (5, 4)
    assert not np.allclose(a, b)
    # evaluation with running stats is per example: a batch of one gives the same rows
    assert np.allclose(f.logits(w, X[:1], stats), a[:1], rtol=1e-12, atol=1e-12)


def test_densenet_plan_units_are_named_records_that_still_index_as_tuples():
    net = M.DenseNet(depth=10, growth=3, bottleneck=True, compression=0.5, input_shape=(3, 8, 8), n_classes=4)
    plan = net.plan()
    kinds = {type(u): u.kind for u in plan}
    assert kinds == {M.Conv: "conv", M.BatchNorm: "bn", M.Keep: "keep", M.Concat: "concat", M.Pool: "pool",
                     M.GlobalPool: "gap", M.Dense: "fc"}
    assert all(u[0] == u.kind for u in plan)
    bns = [u for u in plan if u.kind == "bn"]
    assert net.bn_units() == bns
    assert [u[3] for u in bns] == [u.hw for u in bns]            # the positional reading is the field
    assert tuple(u.channels for u in bns) == net.bn_channels
    shapes = dict(zip(net.layout.names, net.layout.shapes))
    for u in plan:
        if u.kind == "conv":
            assert shapes[f"{u.name}.W"] == (u.out_channels, u.in_channels, u.kernel_size, u.kernel_size)
        elif u.kind == "fc":
            assert shapes["fc.W"] == (u.n_in, u.n_out) and u.n_out == 4


def test_bn_running_update_is_torchs_running_average():
    """r_mean <- 0.9 r_mean + 0.1 mu, r_var <- 0.9 r_var + 0.1 var n/(n-1), n = batch * H * W."""
    theano, tt = M.theano, M.tt
    rng = np.random.default_rng(3)
    x0 = rng.standard_normal((5, 2, 3, 4)) * 2.0 + 1.0
    r0 = (rng.standard_normal(2), rng.uniform(0.5, 2.0, 2))
    rm, rv = theano.shared(r0[0].copy()), theano.shared(r0[1].copy())
    x = tt.tensor4("x")
    _, stats = M.batch_norm(x, tt.ones((2,)), tt.zeros((2,)))
    upd = M.bn_running_update((rm, rv), stats, x.shape[0] * 3 * 4, momentum=0.1)
    assert [u[0] for u in upd] == [rm, rv]
    theano.function([x], [], updates=upd)(x0)
    # float64, 60 values per channel: rounding of a mean and a variance, about 1e-15 relative
    np.testing.assert_allclose(rm.get_value(), 0.9 * r0[0] + 0.1 * x0.mean(axis=(0, 2, 3)), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(rv.get_value(), 0.9 * r0[1] + 0.1 * x0.var(axis=(0, 2, 3), ddof=1), rtol=1e-12)


def test_bn_running_updates_pair_every_bn_layer_with_its_running_average():
    tt = M.tt
    net = M.DenseNet(depth=7, growth=3, input_shape=(3, 8, 8), n_classes=4)
    state = M.SGDState(net, net.init(0))
    stats = [(tt.vector(f"mu{i}"), tt.vector(f"var{i}")) for i in range(net.n_bn)]
    upd = M.bn_running_updates(net, state.bn, stats, 5)
    assert [u[0] for u in upd] == [s for pair in state.bn for s in pair]
    mlp = M.MLP((4, 3, 2), "tanh")
    assert M.bn_running_updates(mlp, [], [], 5) == []
