"""End-to-end tests of ``python -m cpu_ver`` (meta, hypergrad, check) and its errors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cpu_ver.__main__ import main
from cpu_ver.fdcheck import check_methods

REPO = Path(__file__).resolve().parents[1]
TINY = ["--layers", "64,12,10", "--iters", "12", "--batch", "50", "--n-train", "300", "--n-val", "200",
        "--no-progress"]


def _results(d):
    return json.loads((Path(d) / "results.json").read_text())


def test_meta_writes_record_plots_and_validation_loss_falls(tmp_path):
    out = tmp_path / "m"
    assert main(["meta", "--out", str(out), "--meta-iters", "6", "--lr", "0.2", *TINY]) == 0
    r = _results(out)
    assert set(r) >= {"command", "versions", "config", "metrics", "timings"}
    val = r["metrics"]["val_loss"]
    assert len(val) == 6 and val[-1] < val[0]
    assert (out / "learning_curves.png").stat().st_size > 1000
    assert (out / "hyperparameters.png").stat().st_size > 1000
    assert (out / "command.txt").exists()


def test_meta_resume_equals_uninterrupted(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    args = [*TINY, "--meta-iters"]
    assert main(["meta", "--out", str(full), *args, "4"]) == 0
    assert main(["meta", "--out", str(part), *args, "2"]) == 0
    assert main(["meta", "--out", str(part), *args, "4", "--resume"]) == 0
    a, b = _results(full)["metrics"], _results(part)["metrics"]
    for k in ("val_loss", "train_loss", "hypergradient_norm"):
        assert a[k] == b[k], k
    # a second run into a folder with a checkpoint, without --resume, is refused
    assert main(["meta", "--out", str(part), *args, "4"]) == 2


def test_hypergrad_all_agrees_with_finite_differences(tmp_path):
    out = tmp_path / "h"
    assert main(["hypergrad", "--method", "all", "--out", str(out), "--K", "12", *TINY]) == 0
    m = _results(out)["metrics"]
    assert m["reversal_max_abs_error"] == 0.0
    assert m["max_rel_err_exact_vs_fd"] < 1e-6
    assert min(m["cosine_drmad_vs_exact"].values()) > 1 - 1e-9   # K = T: DrMAD equals exact
    assert m["sign_agreement_drmad_vs_exact"].keys() == m["cosine_drmad_vs_exact"].keys()
    assert min(m["sign_agreement_drmad_vs_exact"].values()) == 1.0    # ... so every sign agrees


def test_check_methods_within_tolerance():
    for method, rows in check_methods(T=50).items():
        for group, a, n, err in rows:
            assert err < 1e-6, (method, group, a, n, err)


@pytest.mark.parametrize("args, words", [
    (["--momentum", "1.5"], ["momentum", "1.5"]),
    (["--layers", "10,5,10"], ["input features", "64"]),
    (["--lr", "1e9"], ["fixed-point", "step"]),
    (["--dataset", "mnist", "--data-dir", "/nonexistent-dir"], ["nonexistent-dir"]),
])
def test_bad_input_clear_error_and_nothing_overwritten(tmp_path, capsys, args, words):
    out = tmp_path / "r"
    assert main(["hypergrad", "--out", str(out), *TINY]) == 0
    before = (out / "results.json").read_bytes()
    capsys.readouterr()
    argv = ["hypergrad", "--out", str(out), "--overwrite", *TINY, *args]    # the old run goes only once the new
    assert main(argv) == 2                                                  # one passed its checks
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    for w in words:
        assert w in err, (w, err)
    assert (out / "results.json").read_bytes() == before


def test_cli_subprocess_exit_status(tmp_path):
    p = subprocess.run([sys.executable, "-m", "cpu_ver", "hypergrad", "--momentum", "0", *TINY],
                       cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2 and "momentum" in p.stderr and "Traceback" not in p.stderr


def test_hypergrad_writes_the_hypergradient_per_group_and_method(tmp_path):
    import cpu_ver.__main__ as cpu_main

    tiny = ["--layers", "64,8,10", "--iters", "6", "--batch", "50", "--n-train", "100", "--n-val", "50",
            "--no-progress"]
    for method, computed in (("all", ("exact", "drmad")), ("drmad", ("drmad",))):
        out = tmp_path / method
        assert cpu_main.main(["hypergrad", "--out", str(out), "--method", method, *tiny]) == 0
        saved = np.load(out / "hypergradient.npz")
        groups = ("l2", "lr", "momentum", "init_scale")
        assert sorted(saved.files) == sorted(f"{m}/{g}" for m in computed for g in groups)
        assert saved[f"{computed[0]}/lr"].shape == (6, 4) and np.any(saved[f"{computed[0]}/lr"] != 0)
        assert (out / "hypergradient.png").stat().st_size > 0


def test_meta_plots_the_learned_momentum_and_initial_scales_when_tuned(tmp_path):
    import cpu_ver.__main__ as cpu_main

    tiny = ["--layers", "64,8,10", "--iters", "6", "--batch", "50", "--n-train", "100", "--n-val", "50",
            "--meta-iters", "1", "--no-progress"]
    out = tmp_path / "all"
    assert cpu_main.main(["meta", "--out", str(out), *tiny]) == 0
    assert (out / "schedules.png").stat().st_size > 0 and (out / "hyperparameters.png").exists()
    out = tmp_path / "some"
    assert cpu_main.main(["meta", "--out", str(out), "--hypers", "init_scale", *tiny]) == 0
    assert (out / "schedules.png").exists()
    out = tmp_path / "none"
    assert cpu_main.main(["meta", "--out", str(out), "--hypers", "l2,lr", *tiny]) == 0
    assert not (out / "schedules.png").exists() and (out / "hyperparameters.png").exists()


def test_adaptive_reports_the_baseline_beside_the_adaptive_run(tmp_path):
    """The same metric names as gpu_ver adaptive (shared.online_cli.final_metrics / baseline_metrics)."""
    import cpu_ver.__main__ as cpu_main

    out = tmp_path / "a"
    assert cpu_main.main(["adaptive", "--out", str(out), "--layers", "64,8,10", "--steps", "6", "--batch", "50",
                          "--n-train", "100", "--n-val", "50", "--eval-every", "3", "--no-progress"]) == 0
    m = json.loads((out / "results.json").read_text())["metrics"]
    finals = ("final_train_loss", "final_val_loss", "final_val_error", "test_loss", "test_error")
    for k in finals:
        assert np.isfinite(m[k]) and np.isfinite(m["baseline"][k]), k
    assert m["baseline"]["final_val_loss"] == m["baseline"]["val_loss"][-1]
    assert m["val_loss_adaptive_minus_baseline"] == pytest.approx(m["final_val_loss"] - m["baseline"]["final_val_loss"])
    assert 0 <= m["baseline"]["test_error"] <= 1 and m["baseline"]["optimizer"] == "sgd"


def test_overwrite_keeps_the_new_runs_arrays_and_plot(tmp_path):
    """--overwrite into a finished run folder: the earlier run's files go before the new run
    writes any, so the new hypergradient.npz and .png are there at the end, and are the new run's."""
    import cpu_ver.__main__ as cpu_main

    out = tmp_path / "r"
    assert cpu_main.main(["hypergrad", "--out", str(out), *TINY]) == 0
    first = dict(np.load(out / "hypergradient.npz"))
    assert cpu_main.main(["hypergrad", "--out", str(out), "--overwrite", "--seed", "1", *TINY]) == 0
    assert (out / "hypergradient.png").exists()
    second = dict(np.load(out / "hypergradient.npz"))
    assert sorted(second) == sorted(first) and any(not np.array_equal(first[k], second[k]) for k in first)
