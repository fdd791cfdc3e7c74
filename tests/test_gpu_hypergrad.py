"""``python -m gpu_ver hypergrad``: exact and every DrMAD completion on one MLP problem, their
agreement per group, the run folder, and bad input refused before any work."""
import json

import numpy as np
import pytest

from gpu_ver import config

config.load(device="cpu", floatX="float64")

from gpu_ver import __main__ as cli  # noqa: E402
from gpu_ver.cli import hypergrad as H  # noqa: E402

COMMON = ["--layers", "64,20,10", "--iters", "12", "--batch", "50", "--n-train", "300", "--n-val", "200",
          "--hypers", "l2,lr,momentum,init_scale", "--lr-shape", "iter", "--no-progress", "--device", "cpu"]


def test_agreement_measures():
    e = np.array([1.0, -2.0, 3.0, 0.5])
    r = H.agreement(e * 2, e)
    assert r["cosine"] == pytest.approx(1.0) and r["sign_agreement"] == 1.0 and r["rel_err"] == pytest.approx(1.0)
    r = H.agreement(np.array([1.0, 2.0, 3.0, -0.5]), e)
    assert r["sign_agreement"] == 0.5 and r["cosine"] < 1


def test_all_methods_run_folder_and_agreement(tmp_path, capsys):
    out = tmp_path / "all"
    rc = cli.main(["hypergrad", "--method", "all", "--K", "12", *COMMON, "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    m = res["metrics"]
    assert m["reversal_max_abs_error"] == 0.0 and 1.0 <= m["buffer_over_floor"] <= 1.05
    agree = m["agreement_vs_exact"]
    assert set(agree) == {H.completion_name(12, g, v) for g, v in H.COMPLETIONS}
    # K = T with the velocity reconstructed is the exact recursion to rounding (both grids: every
    # point is a stored one); with the velocity ignored only L2 and the initial scales are given
    for grid in ("t/T", "cumlr"):
        rows = agree[H.completion_name(12, grid, "reconstruct")]
        assert set(rows) == {"l2", "lr", "momentum", "init_scale"}
        assert all(r["rel_err"] < 1e-10 and r["sign_agreement"] == 1.0 for r in rows.values()), rows
        assert set(agree[H.completion_name(12, grid, "ignore")]) == {"l2", "init_scale"}
    with np.load(out / "hypergradient.npz") as z:
        assert {"exact/l2", "exact/lr", f"{H.completion_name(12, 't/T', 'reconstruct')}/lr"} <= set(z.files)
    assert (out / "hypergradient.png").stat().st_size > 0
    assert (out / "command.txt").read_text().startswith("python -m gpu_ver hypergrad")
    assert "information floor" in capsys.readouterr().out


def test_drmad_alone_reports_one_completion(tmp_path):
    rc = cli.main(["hypergrad", "--method", "drmad", "--K", "1", *COMMON, "--out", str(tmp_path / "d")])
    assert rc == 0
    m = json.loads((tmp_path / "d" / "results.json").read_text())["metrics"]
    assert "reversal_max_abs_error" not in m and list(m["hypergradient_norm"]) == ["drmad[K=1,t/T,reconstruct]"]


@pytest.mark.parametrize("argv, words", [
    (["--method", "exact", "--K", "13"], "--K 13 exceeds --iters 12"),
    (["--method", "drmad", "--velocity", "ignore"], "--velocity ignore gives no hypergradient"),
    (["--method", "exact", "--momentum", "1.5"], "--momentum"),
    (["--method", "exact", "--hvp", "fwd"], "--hvp"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, words):
    out = tmp_path / "bad"
    rc = cli.main(["hypergrad", *COMMON, *argv, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and words in err[-1], err
    assert not (out / "results.json").exists()


def test_drmad_meta_loop_with_exact_hypergradients_equals_drmad_with_every_step_stored(tmp_path):
    """``gpu_ver drmad --method exact``: the meta-loop on exact hypergradients follows the same
    path as DrMAD with K = T (the exact recursion, equal to rounding), and evaluates the saved
    hyperparameters."""
    meta = ["--meta-iters", "3", "--meta-lr", "0.1", "--hypers", "l2,lr", "--lr-shape", "iter"]
    common = [c for c in COMMON if c not in ("--hypers", "l2,lr,momentum,init_scale", "--lr-shape", "iter")]
    runs = {}
    for name, extra in (("exact", ["--method", "exact"]), ("kt", ["--method", "drmad", "--K", "12"])):
        assert cli.main(["drmad", *extra, *meta, *common, "--out", str(tmp_path / name)]) == 0
        runs[name] = json.loads((tmp_path / name / "results.json").read_text())["metrics"]
    ex, kt = runs["exact"], runs["kt"]
    assert len(ex["val_loss"]) == 3 and ex["val_loss"][-1] < ex["val_loss"][0]
    for key in ("val_loss", "train_loss", "val_error", "hypergradient_norm", "final_val_loss"):
        np.testing.assert_allclose(ex[key], kt[key], rtol=1e-9, err_msg=key)
    assert (tmp_path / "exact" / "learning_curves.png").stat().st_size > 0
