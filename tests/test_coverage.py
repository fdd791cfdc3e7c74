"""``--l2-on all|weights`` (``shared.coverage``): L2 on the weight matrices only; the other
parameters keep L2 = 0 and their hypergradient entries are 0 (not tuned)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import cpu_ver.__main__ as cpu_main
from shared.errors import ConfigError
from shared.hyperparams import HyperParams, load_for_run
from shared.layout import ParamLayout

LAYOUT = ParamLayout(("W0", "b0", "W1", "b1"), ((3, 4), (4,), (4, 2), (2,)))
BIAS = np.r_[np.zeros(12), np.ones(4), np.zeros(8), np.ones(2)].astype(bool)
CPU_TINY = ["--layers", "64,12,10", "--iters", "8", "--batch", "50", "--n-train", "200", "--n-val", "100",
            "--no-progress"]


def _hp(shape, cover):
    r = np.random.default_rng(0)
    want = {"scalar": (), "block": (4,), "unit": (12,), "param": (26,), "iter": (3,), "iter_block": (3, 4)}[shape]
    return HyperParams.from_values(LAYOUT, 3, {"l2": (r.uniform(0.1, 1, want), "log", shape)},
                                   cover={"l2": cover})


@pytest.mark.parametrize("shape", ["scalar", "block", "unit", "param", "iter", "iter_block"])
def test_masked_expansion_and_its_adjoint(shape):
    h = _hp(shape, "weights")
    t = 1 if shape.startswith("iter") else None
    a = h.per_param("l2", t)
    assert np.all(a[BIAS] == 0) and np.all(a[~BIAS] > 0)
    g = np.random.default_rng(1).standard_normal(26)
    v = np.random.default_rng(2).standard_normal(h.group("l2").free.shape)
    lhs = float(np.sum(h.reduce("l2", g, t) * v))
    # <reduce(g), v> == <g, m * E v> for any v (the expansion is linear)
    ev = HyperParams.from_values(LAYOUT, 3, {"l2": (np.ones_like(v), "identity", shape)}, cover={"l2": "weights"})
    rhs = float(g @ ev.with_free("l2", v).per_param("l2", t))
    assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12)
    sched = h.per_param_schedule("l2")
    assert np.all(sched[:, BIAS] == 0)
    if shape == "block":
        assert np.all(h.reduce("l2", g)[[1, 3]] == 0)


def test_file_records_the_coverage_and_a_run_checks_it(tmp_path):
    h = _hp("block", "weights")
    h.save(tmp_path / "hypers")
    back = HyperParams.load(tmp_path / "hypers")
    assert back.coverage("l2") == "weights"
    assert np.array_equal(back.per_param("l2"), h.per_param("l2"))
    assert load_for_run(tmp_path, LAYOUT, 3, l2_on="weights").coverage("l2") == "weights"
    with pytest.raises(ConfigError, match="learned with --l2-on weights; this run has --l2-on all"):
        load_for_run(tmp_path, LAYOUT, 3, l2_on="all")
    with pytest.raises(ConfigError, match="must be one of all, weights"):
        _hp("block", "biases")


def test_bad_option_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cpu_main.main(["hypergrad", "--l2-on", "bn", "--out", str(tmp_path / "o"), *CPU_TINY])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: argument --l2-on: invalid choice: 'bn'" in err


def _metrics(folder):
    return json.loads((folder / "results.json").read_text())["metrics"]


def test_meta_tunes_only_the_weights_l2_and_hypergrad_matches_fd(tmp_path, capsys):
    out = tmp_path / "meta"
    assert cpu_main.main(["meta", "--out", str(out), "--meta-iters", "2", "--meta-lr", "0.5", "--l2-on", "weights",
                          "--l2-shape", "block", "--hypers", "l2,lr", *CPU_TINY]) == 0
    h = HyperParams.load(out / "hypers")
    assert h.coverage("l2") == "weights"
    l2 = h.value("l2")
    assert l2[1] == pytest.approx(1e-4, rel=1e-12) and l2[3] == pytest.approx(1e-4, rel=1e-12)   # biases: untouched
    assert abs(l2[0] / 1e-4 - 1) > 1e-3 and abs(l2[2] / 1e-4 - 1) > 1e-3                     # weights: tuned
    hg = tmp_path / "hg"
    assert cpu_main.main(["hypergrad", "--out", str(hg), "--method", "all", "--hypers-from", str(out),
                          "--l2-on", "weights", "--hypers", "l2,lr", *CPU_TINY]) == 0
    m = _metrics(hg)
    g = np.asarray(m["hypergradient"]["l2"])
    assert g[1] == 0 and g[3] == 0 and np.all(g[[0, 2]] != 0)
    assert m["max_rel_err_exact_vs_fd"] < 1e-6
    bad = tmp_path / "bad"
    assert cpu_main.main(["hypergrad", "--out", str(bad), "--hypers-from", str(out), "--hypers", "l2,lr",
                          *CPU_TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --hypers-from") and "--l2-on weights" in err[-1]
    assert not bad.exists()
