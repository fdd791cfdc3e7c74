"""``--hypers-from RUN_DIR|FILE`` (``shared.hyperparams.load_for_run``): a run starts from
the hyperparameters an earlier run saved, and refuses a file made for another layout or
number of training steps, saying which."""
from __future__ import annotations

import json

import pytest

import cpu_ver.__main__ as cpu_main
from shared.errors import ConfigError
from shared.hyperparams import load_for_run

CPU_TINY = ["--layers", "64,12,10", "--iters", "8", "--batch", "50", "--n-train", "200", "--n-val", "100",
            "--no-progress"]


def _metrics(folder):
    return json.loads((folder / "results.json").read_text())["metrics"]


@pytest.fixture(scope="module")
def meta_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "meta"
    assert cpu_main.main(["meta", "--out", str(out), "--meta-iters", "1", "--meta-lr", "0.5", *CPU_TINY]) == 0
    return out


def test_hypergrad_starts_from_the_learned_hyperparameters(meta_run, tmp_path):
    want = _metrics(meta_run)["final_val_loss"]
    for source in (meta_run, meta_run / "hypers.json", meta_run / "hypers.npz"):
        out = tmp_path / source.name
        assert cpu_main.main(["hypergrad", "--out", str(out), "--hypers-from", str(source), *CPU_TINY]) == 0
        assert _metrics(out)["val_loss"] == pytest.approx(want, rel=1e-12)
    plain = tmp_path / "plain"
    assert cpu_main.main(["hypergrad", "--out", str(plain), *CPU_TINY]) == 0
    assert _metrics(plain)["val_loss"] != pytest.approx(want, rel=1e-6)


def test_meta_continues_from_the_learned_hyperparameters(meta_run, tmp_path):
    out = tmp_path / "m2"
    assert cpu_main.main(["meta", "--out", str(out), "--meta-iters", "1", "--meta-lr", "0.5",
                          "--hypers-from", str(meta_run), *CPU_TINY]) == 0
    assert _metrics(out)["val_loss"][0] == pytest.approx(_metrics(meta_run)["final_val_loss"], rel=1e-12)


@pytest.mark.parametrize("command", ["hypergrad", "meta"])
@pytest.mark.parametrize("change, words", [
    (["--iters", "12"], ["saved for 8 training steps; this run has 12 (--iters)"]),
    (["--layers", "64,13,10"], ["saved for another layout", "64x12 there", "64x13 in this model"]),
])
def test_a_file_for_another_run_is_refused_saying_which(meta_run, tmp_path, capsys, command, change, words):
    out = tmp_path / "o"
    assert cpu_main.main([command, "--out", str(out), "--hypers-from", str(meta_run), *CPU_TINY, *change]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --hypers-from {meta_run}: ") and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    assert not out.exists()


def test_a_folder_without_hyperparameters_is_named(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cpu_main.main(["hypergrad", "--out", str(tmp_path / "o"), "--hypers-from", str(empty), *CPU_TINY]) == 2
    assert f"--hypers-from {empty}: no hypers.json there" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no such run folder or hyperparameter file"):
        load_for_run(tmp_path / "nothing", None, 8)


def test_tuned_groups_follow_the_command(meta_run):
    from shared.hyperparams import HyperParams

    saved = HyperParams.load(meta_run / "hypers")
    h = load_for_run(meta_run, saved.layout, 8, ("l2",))
    assert h.tuned == ("l2",)
    with pytest.raises(ConfigError, match="has no 'nope' group"):
        load_for_run(meta_run, saved.layout, 8, ("nope",))


# --- adaptive (both backends share shared.online_cli.start_from_hypers) --------------------------

ADAPT_TINY = ["--layers", "64,12,10", "--steps", "8", "--batch", "50", "--n-train", "200", "--n-val", "100",
              "--eval-every", "4", "--no-progress"]


def test_adaptive_starts_from_the_saved_learning_rate_and_l2(meta_run, tmp_path):
    from shared.hyperparams import HyperParams

    saved = HyperParams.load(meta_run / "hypers")
    out = tmp_path / "a"
    assert cpu_main.main(["adaptive", "--out", str(out), "--method", "idbd", "--hypers-from", str(meta_run),
                          *ADAPT_TINY]) == 0
    start = json.loads((out / "results.json").read_text())["config"]["hypers_start"]
    assert start["lr"] == pytest.approx(saved.per_param("lr", 0).tolist(), rel=1e-12)
    assert start["l2"] == pytest.approx(saved.per_param("l2", 0).tolist(), rel=1e-12)
    plain = tmp_path / "p"
    assert cpu_main.main(["adaptive", "--out", str(plain), "--method", "idbd", *ADAPT_TINY]) == 0
    assert _metrics(out)["final_val_loss"] != pytest.approx(_metrics(plain)["final_val_loss"], rel=1e-6)


@pytest.mark.parametrize("change, words", [
    (["--steps", "12"], ["saved for 8 training steps; this run has 12 (--steps)"]),
    (["--layers", "64,13,10"], ["saved for another layout"]),
    (["--method", "almeida"], ["its 'lr' differs between parameters at step 0", "almeida"]),
    (["--method", "hd"], ["its 'lr' differs", "--granularity param"]),
])
def test_adaptive_refuses_a_file_for_another_run(meta_run, tmp_path, capsys, change, words):
    out = tmp_path / "o"
    argv = ["adaptive", "--out", str(out), "--hypers-from", str(meta_run), *ADAPT_TINY, *change]
    assert cpu_main.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --hypers-from {meta_run}: ") and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    assert not out.exists()


def test_scalar_values_start_every_method_and_the_baseline(tmp_path):
    from types import SimpleNamespace

    from shared.hyperparams import standard
    from shared.layout import ParamLayout
    from shared.online_cli import baseline_kwargs, start_from_hypers

    layout = ParamLayout(("W0", "b0"), ((3, 2), (2,)))
    standard(layout, 5, lr=0.07, momentum=0.5, l2=3e-3, init_scales=[0.1, 0.1], l2_shape="scalar",
             lr_shape="scalar").save(tmp_path / "hypers")
    args = SimpleNamespace(hypers_from=str(tmp_path), steps=5, method="t1t2", granularity="global",
                           l2_groups="block", lr=1.0, l2=0.0, l2_init=1.0, momentum=0.9)
    start = start_from_hypers(args, layout)
    assert start == {"lr": pytest.approx(0.07), "l2_init": pytest.approx(3e-3)}
    assert baseline_kwargs(args, start) == {"lr": pytest.approx(0.07), "l2": pytest.approx(3e-3), "momentum": 0.9}


def test_gpu_adaptive_starts_from_the_saved_values_and_refuses_another_run(meta_run, tmp_path, capsys):
    gpu_main = pytest.importorskip("gpu_ver.__main__")
    base = ["adaptive", "--device", "cpu", "--floatX", "float64", "--model", "mlp", "--layers", "12",
            "--n-train", "200", "--n-val", "100", "--batch", "50", "--eval-every", "4", "--no-progress",
            "--hypers-from", str(meta_run)]
    bad = tmp_path / "bad"
    assert gpu_main.main([*base, "--out", str(bad), "--steps", "12", "--method", "smd"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --hypers-from {meta_run}: saved for 8 training steps; this run has 12 (--steps)"), err
    assert not bad.exists()
    assert gpu_main.main([*base, "--out", str(bad), "--steps", "8", "--method", "almeida"]) == 2
    assert "its 'lr' differs between parameters at step 0" in capsys.readouterr().err
    out = tmp_path / "g"
    assert gpu_main.main([*base, "--out", str(out), "--steps", "8", "--method", "smd"]) == 0
    saved = json.loads((out / "results.json").read_text())
    from shared.hyperparams import HyperParams
    h = HyperParams.load(meta_run / "hypers")
    assert saved["config"]["hypers_start"]["lr"] == pytest.approx(h.per_param("lr", 0).tolist(), rel=1e-12)
