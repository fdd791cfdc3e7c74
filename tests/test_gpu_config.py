"""gpu_ver.config and the gpu_ver command line: flags, device choice, one-line errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_ver import config
from shared.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, env=None):
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "gpu_ver", *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=300)


def test_info_reports_cpu_and_c_backend():
    r = cli("info", "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["device"] == "cpu" and d["backend"].startswith("C")
    assert d["floatX"] == "float64" and d["theano_version"] == "1.1.2"
    assert d["compiler"] and d["base_compiledir"]
    assert "We did not find a dynamic library" not in r.stderr


@pytest.mark.skipif(config.probe_gpu()[0], reason="a GPU backend is present here")
def test_cuda_without_gpu_is_a_one_line_error():
    r = cli("info", "--device", "cuda")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: device cuda requested") and "--device cpu" in lines[0]
    assert cli("info", env={"HPO_DEVICE": "cuda"}).returncode == 2


def test_bad_depth_from_cli_is_a_one_line_error(tmp_path):
    r = cli("train", "--dataset", "synthetic-images", "--depth", "41", "--floatX", "float64", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: DenseNet depth 41")


def test_merge_flags_keeps_user_entries_and_applies_ours():
    ours = {"floatX": "float64", "blas__ldflags": "", "device": "cpu"}
    merged = config.merge_flags("floatX=float32,optimizer_excluding=fusion,blas.ldflags=-lfoo", ours)
    items = merged.split(",")
    assert "optimizer_excluding=fusion" in items
    assert "floatX=float64" in items and "floatX=float32" not in items
    assert not any(i.startswith("blas.ldflags") for i in items) and "blas__ldflags=" in items
    # list-valued: the user's tags are kept beside ours
    merged = config.merge_flags("optimizer_excluding=fusion", {"optimizer_excluding": "merge3"}).split(",")
    assert merged == ["optimizer_excluding=merge3:fusion"]


def test_resolve_env_and_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("HPO_THEANO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HPO_FLOATX", "float32")
    s = config.resolve(device="cpu")
    assert s.base_compiledir == str(tmp_path / "cache") and s.floatX == "float32" and s.device == "cpu"
    assert config.resolve(device="cpu", floatX="float64").floatX == "float64"    # option beats env
    with pytest.raises(ConfigError, match="floatX must be one of"):
        config.resolve(device="cpu", floatX="float16")
    monkeypatch.setenv("HPO_DEVICE", "tpu")
    with pytest.raises(ConfigError, match="HPO_DEVICE=tpu"):
        config.resolve()


def test_load_is_idempotent_and_refuses_other_settings():
    th = config.load(device="cpu", floatX="float64")
    assert config.load() is th and config.load(floatX="float64") is th
    with pytest.raises(ConfigError, match="already imported"):
        config.load(floatX="float32")
    assert "blas__ldflags" in os.environ["THEANO_FLAGS"]


def test_merge_flags_puts_users_gcc_flags_after_ours():
    """gcc takes the last -g option: ours (-g0) first, so a user's -g still wins."""
    merged = config.merge_flags("gcc__cxxflags=-g -I/x", {"gcc__cxxflags": "-g0"}).split(",")
    assert merged == ["gcc__cxxflags=-g0 -g -I/x"]
    assert config.merge_flags("", {"gcc__cxxflags": "-g0"}) == "gcc__cxxflags=-g0"
