"""gpu_ver.drmad / gpu_ver.meta: agreement with cpu_ver, DenseNet hypergradients vs finite
differences, one compiled function per step with device-resident state, memory
independent of T, non-finite errors, meta-loop resume and refusal of foreign checkpoints."""
import tracemalloc
import types

import numpy as np
import pytest

from gpu_ver import config

config.load(device="cpu", floatX="float64")

import theano  # noqa: E402

from cpu_ver import drmad as CD  # noqa: E402  (the reference; tests may import it)
from cpu_ver import sgd  # noqa: E402
from gpu_ver import fdcheck as GC  # noqa: E402
from gpu_ver import crosscheck as CC  # noqa: E402
from gpu_ver import drmad as D  # noqa: E402
from gpu_ver import meta  # noqa: E402
from shared.errors import ConfigError, NonFiniteError  # noqa: E402
from shared.meta_opt import Clip, apply_clip, as_clip  # noqa: E402
from shared.records import save_checkpoint  # noqa: E402

T_MLP = 12


@pytest.fixture(scope="module")
def mlp():
    cp, gp, hypers = CC.build(seed=0, T=T_MLP)
    return cp, gp, hypers, D.DrMAD(gp, hypers, K=1)


def test_mlp_trajectory_and_drmad_match_cpu(mlp):
    cp, gp, hypers, eng = mlp
    keep = [1, 5, T_MLP]
    wg = eng.forward(hypers, keep=keep)
    _, _, wc = sgd.train(cp, hypers, snapshots=keep)
    for k in keep:
        assert CC.rel_diff(wg[k], wc[k]) < 1e-12
    rg, rc = eng.hypergradient(hypers), CD.hypergradient(cp, hypers, K=1)
    assert rg.objective == pytest.approx(rc.objective, rel=1e-12)
    assert set(rg.grads) == {"l2", "lr", "momentum", "init_scale"}
    for k, v in rc.grads.items():
        assert rg.grads[k].shape == v.shape
        assert CC.rel_diff(rg.grads[k], v) < 1e-10, k
    np.testing.assert_allclose(rg.grad_w0, rc.grad_w0, rtol=0, atol=1e-10 * np.abs(rc.grad_w0).max())


def test_mlp_segments_cumlr_and_ignore_match_cpu(mlp):
    cp, gp, hypers, _ = mlp
    for K, grid, vel in [(3, "cumlr", "reconstruct"), (2, "t/T", "ignore")]:
        rg = D.DrMAD(gp, hypers, K=K, grid=grid, velocity=vel).hypergradient(hypers)
        rc = CD.hypergradient(cp, hypers, K=K, grid=grid, velocity=vel)
        assert set(rg.grads) == set(rc.grads)
        for k, v in rc.grads.items():
            assert CC.rel_diff(rg.grads[k], v) < 1e-10, (K, grid, vel, k)


def test_one_compiled_reverse_step_with_state_on_device(mlp):
    _, gp, _, eng = mlp
    ins = [i.variable for i in eng.f_reverse.maker.inputs if not i.shared]
    assert [v.name for v in ins] == ["X", "y", "t", "k", "beta"]    # batch, step scalars, per-block beta
    assert [o.variable.ndim for o in eng.f_reverse.maker.outputs] == [0, 0]        # two scalars out
    upd = {str(i.variable) for i in eng.f_reverse.maker.inputs if i.shared and i.update is not None}
    assert {"w_next", "w_cur", "dw", "dv", "dl2", "dlr", "dmomentum"} <= upd
    assert [o.variable.ndim for o in eng.f_step.maker.outputs] == [0, 0]
    assert [i.variable.name for i in eng.f_step.maker.inputs if not i.shared] == ["X", "y", "t"]


def test_no_recompilation_in_the_meta_loop(mlp, monkeypatch, tmp_path):
    _, _, hypers, eng = mlp
    eng.f_eval                     # compiled on first use: meta.run does it before its loop
    calls = []
    orig = theano.function
    monkeypatch.setattr(theano, "function", lambda *a, **k: calls.append(1) or orig(*a, **k))
    h, hist = meta.run(eng, hypers.with_tuned(["l2", "lr"]), n_meta=2, meta_lr=0.05, clip=10.0,
                       progress=False, checkpoint=tmp_path / "c.npz", config={"a": 1})
    assert calls == []
    assert len(hist["val_loss"]) == 2 and all(np.isfinite(hist["val_loss"]))
    assert not np.allclose(h.value("l2"), hypers.value("l2"))


def test_meta_resume_equals_uninterrupted_and_refuses_other_model(mlp, tmp_path):
    _, gp, hypers, eng = mlp
    h0 = hypers.with_tuned(["l2"])
    full, hist_full = meta.run(eng, h0, n_meta=2, progress=False, checkpoint=tmp_path / "a.npz", config={})
    meta.run(eng, h0, n_meta=1, progress=False, checkpoint=tmp_path / "b.npz", config={})
    res, hist = meta.run(eng, h0, n_meta=2, progress=False, checkpoint=tmp_path / "b.npz", config={}, resume=True)
    np.testing.assert_array_equal(res.flatten(), full.flatten())
    assert hist["val_loss"] == hist_full["val_loss"]
    # a checkpoint written for another model (another MLP) is refused, naming the entry
    from gpu_ver import models as M
    other = D.Problem(M.MLP((64, 30, 10), "tanh"), gp.X_train, gp.y_train, gp.X_val, gp.y_val, T_MLP, 50)
    ident = meta.identity(types.SimpleNamespace(problem=other), {})
    save_checkpoint(tmp_path / "other.npz", {"hypers": h0.flatten()}, {**ident, "meta_iter": 1})
    with pytest.raises(ConfigError, match="model"):
        meta.run(eng, h0, n_meta=2, progress=False, checkpoint=tmp_path / "other.npz", config={}, resume=True)
    with pytest.raises(ConfigError, match="option.lr"):    # same model, other settings: the option is named
        meta.run(eng, h0, n_meta=2, progress=False, checkpoint=tmp_path / "a.npz", config={"lr": 1}, resume=True)


def test_non_finite_loss_names_the_step(mlp):
    _, gp, hypers, eng = mlp
    X = gp.X_train
    idx = D.batch_indices(len(gp.y_train), gp.batch_size, gp.batch_seed, 3)
    saved = X[idx[0]].copy()
    X[idx[0]] = np.nan
    try:
        first = min(t for t in range(T_MLP) if idx[0] in D.batch_indices(len(gp.y_train), gp.batch_size,
                                                                          gp.batch_seed, t))
        with pytest.raises(NonFiniteError, match=f"training loss at step {first}"):
            eng.hypergradient(hypers)
    finally:
        X[idx[0]] = saved
    with pytest.raises(ConfigError, match="shapes"):
        eng.hypergradient(gp.hypers(l2_shape="param"))


def test_memory_does_not_grow_with_T(mlp):
    _, gp, _, _ = mlp
    peaks = {}
    for T in (20, 400):
        p = D.Problem(gp.model, gp.X_train, gp.y_train, gp.X_val, gp.y_val, T, 50)
        h = p.hypers(lr=0.1, momentum=0.9, l2=1e-4, l2_shape="unit")
        eng = D.DrMAD(p, h, K=1)
        eng.hypergradient(h)                 # warm up (first-call allocations)
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        eng.hypergradient(h)
        peaks[T] = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        assert eng.shared_bytes() < 20 * 8 * p.layout.size
    assert peaks[400] < peaks[20] * 1.25 + 64 * 1024, peaks


def test_densenet_drmad_matches_finite_differences():
    """Small DenseNet (softplus, batch norm with batch statistics), K = T, float64."""
    problem, hypers = GC.densenet_problem(seed=0, T=4)
    rows = GC.check_drmad(problem, hypers, seed=0)
    assert {r[0] for r in rows} == {"l2", "lr", "momentum", "init_scale"}
    for name, a, n, err in rows:
        assert err < 1e-6, (name, a, n, err)


def test_checkpoint_steps_and_chunks():
    assert list(D.checkpoint_steps(10, 1)) == [0, 10]
    assert list(D.checkpoint_steps(10, 3)) == [0, 3, 7, 10]
    assert list(D.checkpoint_steps(4, 9)) == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError):
        D.checkpoint_steps(10, 0)
    ch = D.val_chunks(1001, 500)
    assert [b - a for a, b in ch] == [334, 334, 333] and ch[-1][1] == 1001
    assert D.val_chunks(10, 1000) == [(0, 10)]


def test_meta_optimisers_and_clip():
    x, g = np.array([1.0, -2.0]), np.array([3.0, -4.0])
    assert np.allclose(apply_clip(g, Clip(1.0)), [0.6, -0.8])
    assert np.allclose(apply_clip(g, Clip(None, 3.5)), [3.0, -3.5])
    assert np.allclose(apply_clip(g, Clip(1.0, 0.7)), [0.6, -0.7])        # the norm first, then the entries
    assert as_clip(2.0) == Clip(norm=2.0) and as_clip(None) == Clip()
    for bad in (0.0, Clip(None, -1.0)):
        with pytest.raises(ConfigError, match="must be positive"):
            as_clip(bad)
    opt = meta.make_optimizer("adam", 0.1)
    x1, _ = opt.update(x, g, opt.init(x))
    assert np.allclose(x1, x - 0.1 * np.sign(g), atol=1e-6)     # first Adam step ~ eta sign(g)
    opt = meta.make_optimizer("sgd", 0.1)
    assert np.allclose(opt.update(x, g, opt.init(x))[0], x - 0.1 * g)
    with pytest.raises(ConfigError):
        meta.make_optimizer("lbfgs", 0.1)


def test_final_figures_are_those_of_the_saved_hyperparameters(mlp):
    """The meta-loop's history ends before its last update; ``evaluate_hypers`` describes
    the hyperparameters the run saves (as cpu_ver's does)."""
    _, _, hypers, eng = mlp
    saved, hist = meta.run(eng, hypers.with_tuned(["l2"]), n_meta=1, progress=False, config={}, meta_lr=0.5)
    final = meta.evaluate_hypers(eng, saved)
    assert final["val_loss"] == pytest.approx(eng.objective_after_training(saved, quantise=True), rel=1e-12)
    assert final["val_loss"] != hist["val_loss"][-1]
    assert set(final) == {"train_loss", "val_loss", "val_error", "test_error"}


def test_drmad_starts_from_hyperparameters_learned_by_cpu_ver_meta(tmp_path, capsys):
    """``gpu_ver drmad --hypers-from RUN_DIR``: cpu_ver meta's saved hyperparameters give
    this backend the same validation loss; a file for another step count is refused."""
    import json

    import cpu_ver.__main__ as cpu_main
    import gpu_ver.__main__ as gpu_main

    tiny = ["--layers", "64,12,10", "--iters", "8", "--batch", "50", "--n-train", "200", "--n-val", "100",
            "--no-progress"]
    learned = tmp_path / "meta"
    assert cpu_main.main(["meta", "--out", str(learned), "--meta-iters", "1", "--meta-lr", "0.5", *tiny]) == 0
    want = json.loads((learned / "results.json").read_text())["metrics"]["final_val_loss"]
    gpu = ["drmad", "--device", "cpu", "--floatX", "float64", "--hypers-from", str(learned), *tiny]
    assert gpu_main.main([*gpu, "--out", str(tmp_path / "g")]) == 0
    got = json.loads((tmp_path / "g" / "results.json").read_text())["metrics"]["val_loss"]
    assert got == pytest.approx(want, rel=1e-9)
    capsys.readouterr()
    assert gpu_main.main([*gpu, "--iters", "9", "--out", str(tmp_path / "g9")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --hypers-from {learned}: saved for 8 training steps; this run has 9 (--iters)"
    assert not (tmp_path / "g9").exists()
