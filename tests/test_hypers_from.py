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
