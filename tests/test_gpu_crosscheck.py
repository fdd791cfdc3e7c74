"""gpu_ver.crosscheck and gpu_ver.fdcheck through the command line: the same MLP problem in
both backends (float64), and finite-difference checks of this backend (MLP part)."""
import json

import numpy as np
import pytest

from gpu_ver import config

config.load(device="cpu", floatX="float64")

from gpu_ver import __main__ as cli  # noqa: E402
from gpu_ver.cli import check, crosscheck, drmad as meta  # noqa: E402


@pytest.fixture(scope="module")
def main():
    """``gpu_ver.__main__.main`` with our commands registered (as the lead registers them)."""
    for name, add, run in [("crosscheck", crosscheck.add_crosscheck_arguments, crosscheck.run_crosscheck),
                           ("check", check.add_check_arguments, check.run_check),
                           ("drmad", meta.add_drmad_arguments, meta.run_drmad)]:
        cli.COMMANDS.setdefault(name, cli.Command(name, add, run))
    return cli.main


def test_crosscheck_command_float64_targets(main, tmp_path):
    rc = main(["crosscheck", "--iters", "12", "--no-adaptive", "--out", str(tmp_path), "--device", "cpu",
               "--floatX", "float64"])
    res = json.loads((tmp_path / "results.json").read_text())
    m = res["metrics"]
    assert rc == 0
    assert m["dtype"] == "float64"
    assert m["max_rel_diff_weights"] < 1e-12
    assert m["max_rel_diff_hypergradient"]["drmad"] < 1e-10
    assert m["max_rel_diff_drmad_full_vs_exact"] < 1e-8
    assert m["max_rel_diff_exact"] <= 1e-12 and m["exact_reversal_bit_exact"] is True
    assert set(m["rel_diff_hypergradient_by_group"]["exact"]) == {"l2", "lr", "momentum", "init_scale"}
    assert set(m["rel_diff_hypergradient_by_group"]["drmad"]) == {"l2", "lr", "momentum", "init_scale"}
    assert {"command", "versions", "config", "metrics", "timings"} <= set(res)


def test_check_command_mlp_part(main, tmp_path, capsys):
    rc = main(["check", "--parts", "mlp", "--iters", "8", "--out", str(tmp_path), "--device", "cpu"])
    res = json.loads((tmp_path / "results.json").read_text())
    assert rc == 0, capsys.readouterr().out
    errs = res["metrics"]["max_rel_err"]
    assert set(errs) == {"drmad_K=T:mlp"} and errs["drmad_K=T:mlp"] < 1e-6
    assert "rel err" in capsys.readouterr().out
    # the exit status is 1 over the tolerance
    rc = main(["check", "--parts", "mlp", "--iters", "8", "--tol", "1e-30", "--out", str(tmp_path / "b"),
               "--device", "cpu"])
    assert rc == 1


def test_drmad_command_meta_loop_and_bad_input(main, tmp_path, capsys):
    out = tmp_path / "m"
    rc = main(["drmad", "--layers", "64,20,10", "--iters", "12", "--batch", "50", "--n-train", "300",
               "--n-val", "200", "--meta-iters", "2", "--lr", "0.2", "--no-progress", "--out", str(out),
               "--device", "cpu"])
    assert rc == 0
    m = json.loads((out / "results.json").read_text())["metrics"]
    assert len(m["val_loss"]) == 2 and np.all(np.isfinite(m["val_loss"]))
    assert (out / "hypers.json").exists() and (out / "checkpoint.npz").exists()
    # resuming with another model is refused (exit status 2, one line naming the model)
    rc = main(["drmad", "--layers", "64,30,10", "--iters", "12", "--batch", "50", "--n-train", "300",
               "--n-val", "200", "--meta-iters", "3", "--no-progress", "--out", str(out), "--resume",
               "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "model" in err
    rc = main(["drmad", "--model", "densenet", "--dataset", "digits", "--out", str(tmp_path / "x"),
               "--device", "cpu"])
    assert rc == 2 and "DenseNet" in capsys.readouterr().err


def test_offline_concepts_have_the_same_names_and_signatures_in_both_backends():
    """Problem, HypergradResult, adjoint_step, meta.run(..., clip=...) and its history keys,
    fdcheck: one shape in cpu_ver and gpu_ver (docs: issue 14's module map)."""
    import inspect

    from cpu_ver import fdcheck as CF, meta as CMeta, problem as CP, reversible as CR
    from gpu_ver import drmad as GD, fdcheck as GF, meta as GMeta, problem as GP, reversible as GR
    from shared.meta_opt import HISTORY_KEYS

    for name in ("from_dataset", "batch", "w0", "layout", "hypers", "describe", "init_base", "default_init_scales"):
        assert hasattr(CP.Problem, name) and hasattr(GP.Problem, name), name
    assert CR.HypergradResult is GR.HypergradResult is GD.HypergradResult
    cpu_args = list(inspect.signature(CR.adjoint_step).parameters)
    assert list(inspect.signature(GR.adjoint_step).parameters) == cpu_args + ["hvp"]
    for run in (CMeta.run, GMeta.run):
        params = inspect.signature(run).parameters
        assert "clip" in params and "clip_norm" not in params and "clip_value" not in params
    assert callable(CF.check_groups) and callable(GF.fd_rows)
    problem, hypers = CF.check_problem(0, 3)
    _, hist = CMeta.run(problem, hypers.with_tuned(["l2"]), n_meta=1, progress=False, clip=1.0)
    assert tuple(hist) == (*HISTORY_KEYS, "seconds") and all(len(v) == 1 for v in hist.values())
    assert hist["meta_objective"][0] == pytest.approx(hist["val_loss"][0], rel=1e-12)   # val objective
