"""gpu_ver.train on a tiny DenseNet and synthetic CIFAR-format images (float64, C backend)."""
import json

import numpy as np
import pytest

from gpu_ver import config

config.load(device="cpu", floatX="float64")

from gpu_ver import train as tr  # noqa: E402
from shared.errors import ConfigError, NonFiniteError  # noqa: E402

TINY = dict(model="densenet", depth=7, growth=3, dataset="synthetic-images", image_size=8, n_train=96, n_val=32,
            n_test=32, epochs=3, batch=16, eval_batch=64, seed=5)


def run(tmp_path, name, **kw):
    cfg = tr.TrainConfig(**{**TINY, **{k: v for k, v in kw.items() if k not in ("resume", "stop_after")}})
    return tr.train(cfg, tmp_path / name, ["test"], resume=kw.get("resume"), stop_after=kw.get("stop_after"),
                    progress=False)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    return d, run(d, "full")


def test_training_loss_falls_and_results_written(full):
    d, res = full
    curves = res["metrics"]["curves"]
    assert curves["epoch"] == [1, 2, 3]
    assert curves["train_loss"][-1] < curves["train_loss"][0]
    assert curves["lr"] == [0.1, 0.1, pytest.approx(0.01)]
    saved = json.loads((d / "full" / "results.json").read_text())
    assert set(saved) >= {"command", "versions", "config", "metrics", "timings"}
    assert (d / "full" / "learning_curves.png").stat().st_size > 0
    assert (d / "full" / "checkpoint.npz").exists()


def test_resume_is_bit_identical(full, tmp_path):
    _, ref = full
    part = run(tmp_path, "part", stop_after=10, checkpoint_every=4)     # stops inside epoch 2
    assert part["metrics"]["steps_done"] == 10 and not part["metrics"]["completed"]
    rest = run(tmp_path, "rest", resume=tmp_path / "part")
    w_ref, w = ref["state"].w.get_value(), rest["state"].w.get_value()
    assert np.array_equal(w, w_ref)
    assert np.array_equal(rest["state"].v.get_value(), ref["state"].v.get_value())
    for (a, b), (c, e) in zip(rest["state"].bn_values(), ref["state"].bn_values()):
        assert np.array_equal(a, c) and np.array_equal(b, e)
    assert rest["metrics"]["curves"] == ref["metrics"]["curves"]
    assert rest["metrics"]["weights_sha256"] == ref["metrics"]["weights_sha256"]


def test_resume_continues_in_its_own_folder(full, tmp_path):
    """``train --resume X --out X`` (the convention of every command that checkpoints)."""
    _, ref = full
    part = run(tmp_path, "part", stop_after=10)
    rest = run(tmp_path, "part", resume=tmp_path / "part")
    assert rest["metrics"]["completed"]
    # the timings count the whole run, the part before the resume too
    assert rest["timings"]["train_s"] == pytest.approx(
        part["timings"]["train_s"] + rest["timings"]["this_process_train_s"], rel=1e-6, abs=0.05)
    assert rest["metrics"]["weights_sha256"] == ref["metrics"]["weights_sha256"]
    assert json.loads((tmp_path / "part" / "results.json").read_text())["metrics"]["completed"]


def test_resume_from_other_model_is_refused(full, tmp_path):
    d, _ = full
    with pytest.raises(ConfigError, match="model"):
        run(tmp_path, "other", growth=4, resume=d / "full" / "checkpoint.npz")
    with pytest.raises(ConfigError, match="train"):
        run(tmp_path, "other2", lr=0.05, resume=d / "full")


def test_existing_output_is_not_overwritten(full):
    d, _ = full
    before = (d / "full" / "results.json").read_bytes()
    with pytest.raises(ConfigError, match="exists"):
        run(d, "full")
    assert (d / "full" / "results.json").read_bytes() == before


def test_nonfinite_loss_names_the_step(tmp_path):
    with pytest.raises(NonFiniteError, match=r"training loss at step \d+"):
        run(tmp_path, "nan", lr=1e200)


def test_lr_schedule():
    assert [tr.lr_at(e, 0.1, 8) for e in range(8)] == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)


MLP_TINY = dict(model="mlp", hidden="6", dataset="synthetic-images", image_size=4, n_train=64, n_val=16, n_test=16,
                epochs=1, batch=16, eval_batch=32, augment=False, seed=1)


def _saved_hypers(folder, hidden="6", lr_shape="scalar"):
    from gpu_ver import models as M
    from shared.hyperparams import standard

    cfg = tr.TrainConfig(**{**MLP_TINY, "hidden": hidden})
    layout = tr.build_model(cfg, tr.load_data(cfg), M).layout
    h = standard(layout, 7, lr=0.02, momentum=0.5, l2=1e-3, init_scales=[0.1] * layout.n_blocks,
                 l2_shape="param", lr_shape=lr_shape)
    h = h.with_value("l2", np.linspace(1e-4, 1e-2, layout.size))
    h.save(folder / "hypers")
    return h


def test_hypers_from_gives_base_lr_and_per_parameter_l2(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    h = _saved_hypers(src)
    res = tr.train(tr.TrainConfig(**MLP_TINY, hypers_from=str(src)), tmp_path / "run", ["test"], progress=False)
    assert res["config"]["hypers_start"]["lr"] == pytest.approx(0.02)
    np.testing.assert_allclose(res["state"].l2.get_value(), h.per_param("l2"), rtol=1e-12)
    assert res["metrics"]["curves"]["lr"][0] == pytest.approx(0.02)
    plain = tr.train(tr.TrainConfig(**MLP_TINY), tmp_path / "plain", ["test"], progress=False)
    assert plain["metrics"]["final_val_loss"] != pytest.approx(res["metrics"]["final_val_loss"], rel=1e-9)


def test_train_command_refuses_in_one_line(tmp_path, capsys):
    import gpu_ver.__main__ as gpu_main

    src = tmp_path / "src"
    src.mkdir()
    _saved_hypers(src, lr_shape="iter")
    out = tmp_path / "o"
    rc = gpu_main.main(["train", "--device", "cpu", "--floatX", "float64", "--model", "mlp", "--hidden", "6",
                        "--dataset", "synthetic-images", "--image-size", "4", "--n-train", "64", "--n-val", "16",
                        "--n-test", "16", "--epochs", "1", "--batch", "16", "--augment", "false", "--seed", "1",
                        "--out", str(out), "--hypers-from", str(src), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: --hypers-from {src}: its 'lr' has shape 'iter'"), err
    assert not (out / "results.json").exists()


@pytest.mark.parametrize("hidden, lr_shape, words", [
    ("6", "iter_block", "its 'lr' has shape 'iter_block'; this command takes one value"),
    ("7", "scalar", "saved for another layout"),
])
def test_hypers_from_refuses_shapes_that_do_not_fit(tmp_path, hidden, lr_shape, words):
    src = tmp_path / "src"
    src.mkdir()
    _saved_hypers(src, hidden=hidden, lr_shape=lr_shape)
    with pytest.raises(ConfigError, match=f"^--hypers-from {src}: ") as e:
        tr.train(tr.TrainConfig(**MLP_TINY, hypers_from=str(src)), tmp_path / "run", ["test"], progress=False)
    assert words in str(e.value)
    assert not (tmp_path / "run").exists()
