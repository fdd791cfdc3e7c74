"""Online methods on the Theano backend (gpu_ver/online/, float64, C backend):
one-step hypergradients against central finite differences and against cpu_ver,
safeguards and bad input, groups, the lazy T1-T2 hyper step, and the ``adaptive``
command on a tiny DenseNet."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings

import numpy as np
import pytest

from gpu_ver import config

config.load(device="cpu", floatX="float64")

from gpu_ver import online as ad  # noqa: E402
from gpu_ver.cli import adaptive as cli  # noqa: E402
from gpu_ver.online.grouping import theano, tt  # noqa: E402
from gpu_ver import models as M  # noqa: E402
from shared.errors import ConfigError, NonFiniteError  # noqa: E402
from shared.interrupt import StopRequested  # noqa: E402
from shared.online_cli import CHECKPOINTS  # noqa: E402

FD_TOL, CROSS_TOL = 1e-6, 1e-10
ALL_CHECKS = list(ad.CHECK_CONFIGS) + list(ad.TRACE_NAMES)


@pytest.fixture(scope="module")
def problem():
    return ad.build_check_problem(0)


@pytest.fixture(scope="module")
def fd_errors():
    return ad.check_all(FD_TOL)


@pytest.fixture(scope="module")
def cross():
    pytest.importorskip("autograd")
    return ad.crosscheck_adaptive(0)


# ---------------------------------------------------------------------------
# Hypergradients

@pytest.mark.parametrize("name", ALL_CHECKS)
def test_one_step_hypergradient_matches_fd(fd_errors, name):
    assert fd_errors[name] < FD_TOL, f"{name}: max relative error {fd_errors[name]:.2e} against central FD"


@pytest.mark.parametrize("name", ALL_CHECKS)
def test_matches_cpu_ver(cross, name):
    assert cross[name] < CROSS_TOL, f"{name}: max relative difference {cross[name]:.2e} from cpu_ver"


def test_hypergradients_are_not_trivial(problem):
    for name in ad.CHECK_CONFIGS:
        for part, o in ad.reference_onestep(name, problem, with_loss=False).items():
            assert np.all(np.isfinite(o.value)) and np.linalg.norm(o.value) > 1e-8, (name, part)


def test_fd_check_can_fail(problem):
    o = ad.reference_onestep("t1t2-block", problem)["l2"]
    assert ad.fd_check(o._replace(value=o.value * 1.01)) > 1e-3
    o = ad.reference_onestep("hd", problem)["lr"]
    assert ad.fd_check(o._replace(value=-o.value)) > 1.0


def test_hd_rule_follows_the_checked_hypergradient(problem):
    """SGD-HD moves alpha by exactly -beta times the hypergradient it stores."""
    run = ad.prepared_run("hd", problem)
    for t in range(3):
        run.step(*ad.check_batch(problem, t))
    a0 = run.state()
    run.step(*ad.check_batch(problem, 3))
    a1 = run.state()
    assert np.allclose(a1["hyper"], a0["hyper"] - 0.05 * a1["hg"], rtol=0, atol=1e-15)
    assert np.all(a1["hg"] != 0)


# ---------------------------------------------------------------------------
# Safeguards and bad input

@pytest.mark.parametrize("name,kw,match", [
    ("hd", dict(beta=-1e-3), "meta step"),
    ("hd", dict(granularity="neuron"), "granularity"),
    ("hd", dict(lr=-0.1), "learning rate"),
    ("idbd", dict(trace_decay=1.5), "trace decay"),
    ("idbd", dict(curvature="full"), "curvature"),
    ("smd", dict(lam=-0.1), "trace decay"),
    ("smd", dict(mu=-1.0), "meta step"),
    ("t1t2", dict(every=0), "interval"),
    ("t1t2", dict(meta_lr=-1.0), "meta step"),
    ("t1t2", dict(at="later"), "next"),
    ("combined", dict(l2_init=0.0), "L2"),
    ("hd", dict(clip=0.0), "clip"),
    ("nope", {}, "unknown method"),
])
def test_bad_options_are_config_errors(name, kw, match):
    layout = M.MLP((5, 4, 3), "tanh").layout
    with pytest.raises(ConfigError, match=match):
        ad.make_method(name, layout, **kw)


def test_empty_validation_split_is_config_error(problem):
    model = M.MLP(problem.sizes, problem.activation)
    method = ad.make_method("t1t2", model.layout, lr=0.1)
    empty = (problem.Xv[:0], problem.yv[:0])
    with pytest.raises(ConfigError, match="validation split is empty"):
        ad.train_online(method, model, (problem.X, problem.y, *empty), 2, 10)


def test_non_finite_loss_names_the_step(problem):
    run = ad.prepared_run("idbd", problem)
    for t in range(2):
        run.step(*ad.check_batch(problem, t))
    X, y = ad.check_batch(problem, 2)
    X = X.copy()
    X[0, 0] = np.nan
    with pytest.raises(NonFiniteError, match="step 2"):
        run.step(X, y)


def test_additive_hd_projects_negative_rates_with_warning(problem):
    run = ad.prepared_run("hd-unit", problem)
    a = run.state()
    # tiny rates and a large previous direction: every unit whose gradient sums to < 0 gets hg > 0
    run.set_state(hyper=np.full(a["hyper"].shape, 1e-9), u=np.full(a["u"].shape, 1e3))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for t in range(6):
            run.step(*ad.check_batch(problem, t))
    a = run.state()
    assert np.all(a["hyper"] >= 1e-12) and a["n_projected"] > 0
    assert sum("projected" in str(r.message) for r in rec) == 1          # warned once per run


# ---------------------------------------------------------------------------
# Groups and the lazy T1-T2 hyper step

def test_groups_on_densenet_layout():
    net = M.DenseNet(7, 4, input_shape=(3, 8, 8))
    lay = net.layout
    unit = ad.Grouping(lay, "unit")
    conv = sum(s[0] for s in lay.shapes if len(s) == 4)          # one group per output channel
    bn = sum(s[0] for s in lay.shapes if len(s) == 1 and s[0] != net.n_classes)
    assert unit.n == conv + bn + net.n_classes
    blk = ad.Grouping(lay, "block")
    x = np.random.default_rng(0).standard_normal(lay.size)
    assert np.allclose(blk.reduce_np(x), [x[lay.slice(b)].sum() for b in range(lay.n_blocks)])
    # symbolic expand/reduce agree with the numpy twins
    T = tt
    h, v = T.vector("h"), T.vector("v")
    for gr in (unit, blk, ad.Grouping(lay, "global")):
        f = theano.function([h, v], [gr.expand(h) * v, gr.reduce(v)])
        hv = np.random.default_rng(1).standard_normal(gr.n)
        e, r = f(hv, x)
        assert np.allclose(e, gr.expand_np(hv) * x) and np.allclose(r, gr.reduce_np(x))


def test_t1t2_every_n_steps_is_lazy_and_exact(problem):
    model = M.MLP(problem.sizes, problem.activation)
    method = ad.make_method("t1t2", model.layout, lr=0.3, l2_init=1e-2, meta_lr=0.1, every=3)
    run = ad.OnlineRun(model, method, problem.w0)
    s0 = run.state()["r_s"].copy()
    ks, changed = [], []
    for t in range(6):
        run.step(*ad.check_batch(problem, t), *ad.check_val_batch(problem, t))
        a = run.state()
        ks.append(int(a["r_k"]))
        changed.append(not np.array_equal(a["r_s"], s0))
        s0 = a["r_s"].copy()
    assert ks == [0, 0, 1, 1, 1, 2]
    assert changed == [False, False, True, False, False, True]


# ---------------------------------------------------------------------------
# The adaptive command on a tiny DenseNet

def _args(tmp_path, *extra):
    p = cli.add_adaptive_arguments(argparse.ArgumentParser())
    return p.parse_args(["--out", str(tmp_path / "run"), "--depth", "7", "--growth", "4", "--image-size", "8",
                         "--n-train", "128", "--n-val", "64", "--n-test", "64", "--steps", "12", "--batch", "16",
                         "--eval-every", "6", "--eval-train-n", "64", "--no-progress", *extra])


def test_adaptive_command_densenet(tmp_path):
    res = cli.run_adaptive(_args(tmp_path, "--method", "hd", "--lr", "0.05", "--beta", "1e-3"))
    m = res["metrics"]
    assert m["step"] == [0, 6, 12]
    assert np.all(np.isfinite(m["val_loss"])) and np.isfinite(m["baseline"]["final_val_loss"])
    assert m["baseline"]["optimizer"] == "sgd" and m["baseline"]["step"] == m["step"]
    assert np.array(m["lr_quantiles"]).shape == (3, len(m["blocks"]), len(m["quantiles"]))
    assert m["lr_quantiles"][0][0][2] == pytest.approx(0.05)
    assert m["lr_quantiles"][-1][0][2] != pytest.approx(0.05, abs=1e-12)      # the rate moved
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["metrics"]["final_val_loss"] == pytest.approx(m["final_val_loss"])
    assert saved["config"]["model_description"]["model"] == "densenet"
    for f in ("curves.png", "hyperparameters.png", "hyper_heatmap.png"):
        assert (tmp_path / "run" / f).stat().st_size > 0


def test_plots_skipped_without_matplotlib(tmp_path, monkeypatch):
    for k in [k for k in sys.modules if k == "matplotlib" or k.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, k)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = {"step": [0], "train_loss": [1.0], "val_loss": [1.0], "val_error": [0.5], "blocks": ["W"],
           "lr_quantiles": [[[1.0] * 5]], "l2_quantiles": [[[0.0] * 5]]}
    with pytest.warns(RuntimeWarning, match="matplotlib"):
        assert cli.try_plot(tmp_path, res, None, "hd", "sgd") == []


def test_adaptive_command_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="--data-dir"):
        cli.run_adaptive(_args(tmp_path, "--dataset", "cifar10"))
    with pytest.raises(ConfigError, match="validation split is empty"):
        cli.run_adaptive(_args(tmp_path, "--method", "t1t2", "--n-val", "0"))
    with pytest.raises(ConfigError, match="depth"):
        cli.run_adaptive(_args(tmp_path, "--depth", "8"))


def test_registers_in_gpu_ver_main(tmp_path, monkeypatch):
    """As ``python -m gpu_ver adaptive`` once registered: common options (--seed, --out, --device,
    --floatX) come from gpu_ver.__main__, the rest from add_adaptive_arguments; MLP on digits."""
    main = pytest.importorskip("gpu_ver.__main__")
    if not hasattr(main, "Command") or not hasattr(main, "COMMANDS"):
        pytest.skip("gpu_ver.__main__ has no command registry")
    cmd = main.Command("online adaptation", cli.add_adaptive_arguments, cli.run_adaptive_command)
    monkeypatch.setitem(main.COMMANDS, "adaptive", main.COMMANDS.get("adaptive", cmd))
    out = tmp_path / "mlp"
    rc = main.main(["adaptive", "--device", "cpu", "--floatX", "float64", "--seed", "3", "--out", str(out),
                    "--model", "mlp", "--layers", "20", "--method", "sgdn-hd", "--granularity", "block",
                    "--n-train", "200", "--steps", "5", "--batch", "20", "--eval-every", "5", "--no-progress"])
    assert rc == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["seed"] == 3 and saved["metrics"]["baseline"]["optimizer"] == "sgdn"
    assert saved["command"][:4] == ["python", "-m", "gpu_ver", "adaptive"]


# ---------------------------------------------------------------------------
# Checkpoints and --resume

def _mlp_args(out, *extra):
    p = cli.add_adaptive_arguments(argparse.ArgumentParser())
    return p.parse_args(["--out", str(out), "--model", "mlp", "--layers", "16", "--n-train", "200", "--n-val", "60",
                         "--n-test", "60", "--steps", "12", "--batch", "20", "--eval-every", "5",
                         "--eval-train-n", "100", "--method", "idbd", "--lr", "0.05", "--no-progress", *extra])


def _metrics(run_dir):
    return json.loads((run_dir / "results.json").read_text())["metrics"]


def test_adaptive_command_resumes_to_the_same_results(tmp_path, monkeypatch):
    cli.run_adaptive(_mlp_args(tmp_path / "full"))
    want = _metrics(tmp_path / "full")
    assert want["step"] == [0, 5, 10, 12] and want["baseline"]["step"] == want["step"]

    # stopped inside the adaptive run (checkpoints at 4 and at the stop), then inside the baseline
    cut = tmp_path / "cut"
    r = cli.run_adaptive(_mlp_args(cut, "--checkpoint-every", "4", "--stop-after", "7"))
    assert (r["completed"], r["phase"], r["steps_done"]) == (False, "adaptive", 7)
    assert not (cut / "results.json").exists() and not (cut / CHECKPOINTS["baseline"]).exists()
    r = cli.run_adaptive(_mlp_args(cut, "--resume", str(cut), "--stop-after", "17"))
    assert (r["phase"], r["steps_done"]) == ("baseline", 5)
    cli.run_adaptive(_mlp_args(cut, "--resume", str(cut / CHECKPOINTS["adaptive"])))
    assert _metrics(cut) == want
    assert json.dumps(_metrics(cut)) == json.dumps(want)           # same types too (step 10, not 10.0)

    # Ctrl-C during the record after step 5: the record is finished, the run stops before
    # step 6 (shared.interrupt), the checkpoint holds step 5 with its record
    calls = {"n": 0}
    real_evaluate = ad.OnlineRun.evaluate

    def evaluate(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:              # records: step 0 (train, val), then step 5 -> interrupt
            os.kill(os.getpid(), signal.SIGINT)
        return real_evaluate(self, *a, **k)

    monkeypatch.setattr(ad.OnlineRun, "evaluate", evaluate)
    ctrl_c = tmp_path / "ctrl_c"
    with pytest.raises(StopRequested):
        cli.run_adaptive(_mlp_args(ctrl_c))
    monkeypatch.setattr(ad.OnlineRun, "evaluate", real_evaluate)
    from shared.records import load_checkpoint  # noqa: PLC0415

    arrays, meta = load_checkpoint(ctrl_c / CHECKPOINTS["adaptive"])
    assert meta["step"] == 5 and arrays["curve/step"].tolist() == [0, 5]
    cli.run_adaptive(_mlp_args(ctrl_c, "--resume", str(ctrl_c)))
    assert _metrics(ctrl_c) == want

    # refusals: another configuration, an occupied folder, nothing to resume
    with pytest.raises(ConfigError, match="option.lr"):
        cli.run_adaptive(_mlp_args(cut, "--resume", str(cut), "--lr", "0.1"))
    with pytest.raises(ConfigError, match="already holds"):
        cli.run_adaptive(_mlp_args(cut))
    with pytest.raises(ConfigError, match="no checkpoint-adaptive.npz"):
        cli.run_adaptive(_mlp_args(tmp_path / "empty", "--resume", str(tmp_path / "empty")))
    assert _metrics(cut) == want                                   # nothing overwritten


def test_diverged_command_run_stops_naming_the_step(tmp_path):
    """--lr 1e30: the loss stays finite but huge; the run stops at the record that saw it
    (shared.errors.check_loss, as cpu_ver adaptive), instead of reporting it."""
    from shared.errors import NonFiniteError  # noqa: PLC0415

    with pytest.raises(NonFiniteError, match=r"training loss .*at step 5"):
        cli.run_adaptive(_mlp_args(tmp_path / "d", "--lr", "1e30", "--method", "hd", "--no-baseline"))
    assert not (tmp_path / "d" / "results.json").exists()
