"""gpu_ver/fncache.py: a stored optimised function is reused with the caller's shared
variables, gives what a fresh compile gives, and a bad entry is recompiled."""
import numpy as np
import pytest

from gpu_ver import config

config.load(device="cpu", floatX="float64")

from gpu_ver import fncache  # noqa: E402
from gpu_ver import models as M  # noqa: E402


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(fncache, "cache_dir", lambda: tmp_path)
    monkeypatch.delenv(fncache.ENV_SWITCH, raising=False)
    return tmp_path


def _run(state, steps, seed=0):
    rng = np.random.default_rng(seed)
    step = M.compile_sgd_step(state, 0.9, nesterov=True)
    shape = (5, *state.model.input_shape)
    out = []
    for _ in range(steps):
        X, y = rng.standard_normal(shape), rng.integers(0, 4, 5)
        out.append(step(X, y)[0])
    return np.array(out), state.w.get_value()


def test_cached_function_uses_the_callers_state_and_equals_a_fresh_compile(cache, monkeypatch):
    net = M.DenseNet(7, 3, input_shape=(3, 8, 8), n_classes=4, batch_size=5)
    losses1, w1 = _run(M.SGDState(net, net.init(0), lr=0.05, l2=1e-4), 3)
    files = sorted(cache.glob("sgd_step-*.pkl"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    # a second state with other weights: served from the file, and it trains THIS state
    losses2, w2 = _run(M.SGDState(net, net.init(1), lr=0.05, l2=1e-4), 3)
    assert files[0].stat().st_mtime_ns == stamp and len(list(cache.glob("*.pkl"))) == 1
    monkeypatch.setenv(fncache.ENV_SWITCH, "0")
    losses_ref, w_ref = _run(M.SGDState(net, net.init(1), lr=0.05, l2=1e-4), 3)
    assert np.array_equal(losses2, losses_ref) and np.array_equal(w2, w_ref)
    assert not np.array_equal(w1, w2)


def test_other_graph_other_key_and_a_corrupt_entry_is_recompiled(cache):
    net = M.MLP((6, 5, 4), "tanh")
    st = M.SGDState(net, net.init(0), lr=0.05)
    M.compile_sgd_step(st, 0.9, nesterov=True)
    M.compile_sgd_step(st, 0.9, nesterov=False)          # another graph
    files = sorted(cache.glob("sgd_step-*.pkl"))
    assert len(files) == 2
    for f in files:
        f.write_bytes(b"not a pickle")
    _, w = _run(M.SGDState(net, net.init(0), lr=0.05), 1)     # nesterov=True: recompiled, stored again
    assert np.all(np.isfinite(w))
    sizes = sorted(f.stat().st_size for f in cache.glob("sgd_step-*.pkl"))
    assert len(sizes) == 2 and sizes[0] == len(b"not a pickle") and sizes[1] > 10_000


def test_online_run_and_drmad_through_the_cache_equal_fresh_compiles(cache, monkeypatch):
    from gpu_ver import online as ad  # noqa: PLC0415
    from gpu_ver import crosscheck as CC  # noqa: PLC0415
    from gpu_ver import drmad as D  # noqa: PLC0415

    problem = ad.build_check_problem(0)
    model = M.MLP(problem.sizes, problem.activation)
    _, gp, hypers = CC.build(seed=0, T=4)

    def online():
        run = ad.OnlineRun(model, ad.make_method("idbd", model.layout, lr=0.3, theta=0.1), problem.w0)
        losses = [run.step(*ad.check_batch(problem, t))["loss"] for t in range(3)]
        return losses, run.state()

    def drmad():
        r = D.DrMAD(gp, hypers, K=1).hypergradient(hypers)
        return r.objective, r.grads

    first = online(), drmad()
    names = sorted(f.name.split("-")[0] for f in cache.glob("*.pkl"))
    assert "idbd_step" in names and "drmad_reverse_step" in names and "drmad_forward_step" in names
    stamps = {f: f.stat().st_mtime_ns for f in cache.glob("*.pkl")}
    second = online(), drmad()                                # served from the files
    assert {f: f.stat().st_mtime_ns for f in cache.glob("*.pkl")} == stamps
    monkeypatch.setenv(fncache.ENV_SWITCH, "0")
    fresh = online(), drmad()
    for got in (first, second):
        (losses, state), (obj, grads) = got
        (losses_f, state_f), (obj_f, grads_f) = fresh
        assert losses == losses_f and obj == obj_f
        assert all(np.array_equal(state[k], state_f[k]) for k in state_f)
        assert all(np.array_equal(grads[k], grads_f[k]) for k in grads_f)


def test_a_compile_says_so_and_a_cached_one_is_quiet(cache, monkeypatch, capsys):
    """A first compile can be silent for minutes: it names itself with the elapsed time."""
    import theano.tensor as T  # noqa: PLC0415

    monkeypatch.setattr(fncache, "NOTICE_AFTER_S", 0.0)
    x = T.dvector("x")
    f = fncache.function([x], [(x ** 3).sum()], name="notice_probe")
    assert f(np.arange(3.0))[0] == 9.0
    err = capsys.readouterr().err
    assert "compiling notice_probe (first run; cached afterwards)" in err, err
    assert "compiled notice_probe in " in err, err
    fncache.function([x], [(x ** 3).sum()], name="notice_probe")      # from the file: nothing to say
    assert "compiling" not in capsys.readouterr().err


def test_slow_notice_prints_only_for_a_long_wait():
    import io  # noqa: PLC0415
    import time  # noqa: PLC0415

    from shared.notice import slow_notice  # noqa: PLC0415

    quick, slow = io.StringIO(), io.StringIO()
    with slow_notice("x", after=5.0, stream=quick):
        pass
    with slow_notice("graph", after=0.01, every=0.05, stream=slow):
        time.sleep(0.2)
    assert quick.getvalue() == ""
    lines = slow.getvalue().splitlines()
    assert lines[0] == "compiling graph (first run; cached afterwards) ..."
    assert any(s.startswith("  still compiling graph: ") for s in lines[1:-1])
    assert lines[-1].startswith("compiled graph in ") and lines[-1].endswith(" s")
