"""Tests for shared.records: run folders, atomic JSON, results, checkpoints, figures."""
from __future__ import annotations

import datetime as dt
import json
import math
import platform
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from shared import records as rec
from shared.errors import ConfigError, DataError
from shared.layout import ParamLayout


def test_default_run_dir_format_and_uniqueness(tmp_path):
    now = dt.datetime(2024, 3, 5, 7, 8, 9)
    p = rec.default_run_dir("hypergrad", root=tmp_path, now=now)
    assert p == tmp_path / "hypergrad-20240305-070809"
    rec.make_run_dir(p)
    rec.make_run_dir(p)  # fine if it exists
    assert p.is_dir()
    assert rec.default_run_dir("hypergrad", root=tmp_path, now=now) == tmp_path / "hypergrad-20240305-070809-2"
    assert rec.default_run_dir("meta").parent == Path("runs")


def test_make_run_dir_file_in_the_way(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="file is in the way"):
        rec.make_run_dir(tmp_path / "f")


def test_versions_reads_metadata_without_importing():
    had_theano = "theano" in sys.modules
    v = rec.versions(("numpy", "theano", "surely-not-installed-pkg"))
    assert v["python"] == platform.python_version()
    assert v["numpy"] == np.__version__
    assert v["surely-not-installed-pkg"] == "absent"
    assert v["theano"] != "absent"  # Theano-PyMC is installed in this environment
    if not had_theano:
        assert "theano" not in sys.modules
    assert set(rec.versions()) == {"python", "numpy", "scipy", "autograd", "theano"}


@dataclass
class _DC:
    a: tuple
    b: float


def test_to_jsonable_conversions():
    obj = {"i": np.int32(3), "f": np.float32(0.5), "b": np.bool_(True), "arr": np.arange(4).reshape(2, 2),
           "nan": float("nan"), "inf": np.float64(np.inf), "arr_nan": np.array([1.0, np.nan, -np.inf]),
           "path": Path("/a/b"), "tup": (1, (2, 3)), 5: "int key", "dc": _DC((1,), 2.0),
           "layout": ParamLayout(("W",), ((2, 3),)), "set": {3, 1}}
    j = rec.to_jsonable(obj)
    assert j == {"i": 3, "f": 0.5, "b": True, "arr": [[0, 1], [2, 3]], "nan": None, "inf": None,
                 "arr_nan": [1.0, None, None], "path": "/a/b", "tup": [1, [2, 3]], "5": "int key",
                 "dc": {"a": [1], "b": 2.0}, "layout": {"names": ["W"], "shapes": [[2, 3]]}, "set": [1, 3]}
    assert type(j["i"]) is int and type(j["f"]) is float and type(j["b"]) is bool
    json.dumps(j, allow_nan=False)  # strict JSON
    with pytest.raises(TypeError, match=r"value\['x'\]\[1\]: cannot store an object of type object"):
        rec.to_jsonable({"x": [1, object()]})


def test_write_json_atomic_round_trip_and_strict(tmp_path):
    p = tmp_path / "r.json"
    rec.write_json_atomic(p, {"loss": [np.float64(1.5), math.nan]})
    text = p.read_text()
    assert "NaN" not in text
    assert json.loads(text) == {"loss": [1.5, None]}
    assert rec.read_json(p) == {"loss": [1.5, None]}


def test_write_json_atomic_serialisation_failure_keeps_old_file(tmp_path):
    p = tmp_path / "r.json"
    rec.write_json_atomic(p, {"v": 1})
    before = p.read_bytes()
    with pytest.raises(TypeError):
        rec.write_json_atomic(p, {"v": 2, "bad": object()})
    assert p.read_bytes() == before
    assert [q.name for q in tmp_path.iterdir()] == ["r.json"]


def test_write_json_atomic_failure_during_write_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "r.json"
    rec.write_json_atomic(p, {"v": 1})
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(rec.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        rec.write_json_atomic(p, {"v": 2})
    assert p.read_bytes() == before
    assert [q.name for q in tmp_path.iterdir()] == ["r.json"]


def test_write_and_read_results(tmp_path):
    argv = ["python", "-m", "cpu_ver", "hypergrad", "--out", "dir with space", "--layers", "64,50,10", "it's"]
    out = tmp_path / "run"
    p = rec.write_results(out, argv, config={"lr": 0.1, "layers": (64, 50, 10)},
                          metrics={"val_loss": np.float64(0.25), "curve": np.array([1.0, 0.5])},
                          timings={"forward": 1.5})
    assert p == out / "results.json"
    r = rec.read_results(out)
    assert set(r) == {"command", "versions", "config", "metrics", "timings"}
    assert r["command"] == argv and r["config"]["layers"] == [64, 50, 10]
    assert r["metrics"] == {"val_loss": 0.25, "curve": [1.0, 0.5]} and r["timings"] == {"forward": 1.5}
    assert r["versions"]["numpy"] == np.__version__
    assert rec.read_results(p) == r
    line = (out / "command.txt").read_text()
    assert line.endswith("\n") and shlex.split(line) == argv


def test_read_results_errors(tmp_path):
    with pytest.raises(DataError, match="results.json: file not found"):
        rec.read_results(tmp_path)
    (tmp_path / "results.json").write_text('{"command": [')
    with pytest.raises(DataError, match="results.json: not valid JSON"):
        rec.read_results(tmp_path)


def test_checkpoint_round_trip(tmp_path):
    p = tmp_path / "ck" / "state.npz"
    arrays = {"w": np.random.default_rng(0).normal(size=(3, 4)), "step": np.array(17),
              "ints": np.arange(5, dtype=np.int64), "mask": np.array([True, False])}
    meta = {"model": "mlp", "layers": (64, 50, 10), "lr": 0.1, "t": np.int64(17)}
    rec.save_checkpoint(p, arrays, meta)
    assert [q.name for q in p.parent.iterdir()] == ["state.npz"]
    got, m = rec.load_checkpoint(p, expect={"model": "mlp", "layers": (64, 50, 10)})
    assert set(got) == set(arrays)
    for k in arrays:
        np.testing.assert_array_equal(got[k], arrays[k])
        assert got[k].dtype == arrays[k].dtype
    assert m == {"model": "mlp", "layers": [64, 50, 10], "lr": 0.1, "t": 17}


def test_checkpoint_mismatch_names_key_and_values(tmp_path):
    p = tmp_path / "state.npz"
    rec.save_checkpoint(p, {"w": np.zeros(3)}, {"layers": [64, 50, 10], "seed": 0})
    with pytest.raises(ConfigError) as e:
        rec.load_checkpoint(p, expect={"seed": 0, "layers": (784, 50, 10)})
    msg = str(e.value)
    assert str(p) in msg and "layers" in msg and "[64, 50, 10]" in msg and "[784, 50, 10]" in msg
    with pytest.raises(ConfigError, match="no 'depth'"):
        rec.load_checkpoint(p, expect={"depth": 40})


def test_checkpoint_missing_corrupt_and_reserved(tmp_path):
    with pytest.raises(DataError, match=r"absent.npz: checkpoint not found"):
        rec.load_checkpoint(tmp_path / "absent.npz")
    p = tmp_path / "state.npz"
    rec.save_checkpoint(p, {"w": np.arange(1000.0)}, {})
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(DataError, match=r"state.npz: corrupt or truncated"):
        rec.load_checkpoint(p)
    np.savez(tmp_path / "plain.npz", w=np.zeros(2))
    with pytest.raises(DataError, match="no '__meta__'"):
        rec.load_checkpoint(tmp_path / "plain.npz")
    with pytest.raises(ConfigError, match="reserved"):
        rec.save_checkpoint(p, {"__meta__": np.zeros(1)}, {})
    with pytest.raises(ConfigError, match="numeric arrays only"):
        rec.save_checkpoint(p, {"o": np.array([object()])}, {})


def test_checkpoint_overwrite_is_atomic(tmp_path, monkeypatch):
    p = tmp_path / "state.npz"
    rec.save_checkpoint(p, {"w": np.ones(3)}, {"step": 1})

    def boom(*a, **k):
        raise OSError("killed")

    monkeypatch.setattr(rec.os, "replace", boom)
    with pytest.raises(OSError):
        rec.save_checkpoint(p, {"w": np.zeros(3)}, {"step": 2})
    monkeypatch.undo()
    arrays, meta = rec.load_checkpoint(p)
    assert meta == {"step": 1} and arrays["w"].tolist() == [1.0, 1.0, 1.0]
    assert [q.name for q in tmp_path.iterdir()] == ["state.npz"]


def test_save_figure(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    p = rec.save_figure(fig, tmp_path / "plots" / "curve.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)
    assert [q.name for q in p.parent.iterdir()] == ["curve.png"]
