"""Fast checks of the one-shot GPU scripts (scripts/gpu/): syntax, report building,
CUDA library linking on a fake folder tree, part timeouts, .deb unpacking, and the
bundled Python 3.11 starting from an unpacked folder (when gpu_bundle/ exists)."""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = os.path.join(ROOT, "scripts", "gpu")
BUNDLE = os.path.join(ROOT, "gpu_bundle")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(GPU, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gr = _load("gpu_report")
smoke = _load("gpu_smoke")


@pytest.mark.parametrize("script", ["prepare.sh", "run_on_gpu.sh"])
def test_shell_syntax(script):
    r = subprocess.run(["bash", "-n", os.path.join(GPU, script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", ["gpu_report.py", "gpu_smoke.py", "torch_densenet.py"])
def test_python_compiles(script):
    with open(os.path.join(GPU, script)) as f:
        compile(f.read(), script, "exec")


# --------------------------------------------------------------------------- report
CANNED = {
    "environment": {"gpu_name": "NVIDIA H100 80GB HBM3", "gpu_present": True},
    "total_seconds": 301.4,
    "parts": [
        {"name": "info", "status": "ok", "seconds": 21.0,
         "figures": {"device": "cuda", "backend": "gpuarray (CUDA)", "gpu_present": True}},
        {"name": "smoke", "status": "ok", "seconds": 30.2,
         "figures": {"smoke": {"gemm_rel_err": 2.1e-7, "conv_rel_err": 3e-7, "passed": True, "devname": "H100"}}},
        {"name": "crosscheck", "status": "failed", "seconds": 3.0, "rc": 2,
         "reason": "rc=2: ConfigError: device cuda requested but no usable GPU backend"},
        {"name": "densenet", "status": "timeout", "seconds": 180.0, "reason": "timed out after 180s; last line: x"},
        {"name": "drmad", "status": "skipped", "seconds": None, "reason": "budget exhausted (5s left)"},
        {"name": "torch_densenet", "status": "ok", "seconds": 12.0,
         "figures": {"images_per_s": 5123.4, "hvp_ms": 40.2}},
    ],
}


def test_table_from_canned_results():
    t = gr.format_table(CANNED)
    lines = t.splitlines()
    assert "NVIDIA H100 80GB HBM3" in lines[0]
    assert lines[1].split()[:3] == ["part", "status", "secs"]
    body = "\n".join(lines[3:])
    assert "gemm err=2.1e-07" in body and "pass=True" in body and "card=H100" in body
    assert "ConfigError: device cuda requested" in body
    assert "img/s=5.12e+03" in body and "hvp ms=40.2" in body
    assert "budget exhausted" in body
    assert lines[-1] == "summary: failed 1, ok 3, skipped 1, timeout 1"


def test_parse_figures_json_lines_and_key_values():
    out = "WARNING (theano): blah\nPASS x\n{\"a\": 1}\nRESULT {\"b\": 2.5}\n{\"a\": 3}\n"
    assert gr.parse_figures(out) == {"a": 3, "b": 2.5}
    assert gr.parse_figures('{\n "device": "cpu",\n "floatX": "float64"\n}\n') == {"device": "cpu", "floatX": "float64"}
    indented = 'WARNING (theano.tensor.blas): x\n{\n  "device": "cuda",\n  "gpu_present": true\n}\nafter: 1\n'
    assert gr.parse_figures(indented) == {"device": "cuda", "gpu_present": True}
    assert gr.parse_figures("device   cpu\nfloatX   float64\n") == {"device": "cpu", "floatX": "float64"}
    kv = gr.parse_figures("device: cuda\nfloatX = float32\nTraceback: no\n")
    assert kv == {"device": "cuda", "floatX": "float32"}


def test_failure_reason_picks_exception_line():
    text = "Traceback (most recent call last):\n  File \"x\", line 1\nshared.errors.ConfigError: bad --device\n"
    assert gr.failure_reason(text) == "shared.errors.ConfigError: bad --device"
    assert gr.failure_reason("") == "(no output)"


def test_cpu_fallback_command_and_part_specs():
    assert gr.cpu_fallback_command("py311 -m gpu_ver x --device cuda --floatX float32") == \
        "py311 -m gpu_ver x --device cpu --floatX float32"
    assert gr.cpu_fallback_command("py311 a.py --device=cuda0") == "py311 a.py --device=cpu"
    specs = {s["name"]: s for s in gr.part_specs({"HPO_CMD_DRMAD": "py311 -m gpu_ver drmad --x 1",
                                                  "HPO_T_DRMAD": "12", "HPO_CMD_DENSENET": ""})}
    assert specs["drmad"]["command"] == "py311 -m gpu_ver drmad --x 1" and specs["drmad"]["limit"] == 12
    assert specs["densenet"]["disabled"] and not specs["info"]["disabled"]
    only = {s["name"]: s["disabled"] for s in gr.part_specs({"HPO_PARTS": "info,smoke"})}
    assert only == {"info": False, "smoke": False, "crosscheck": True, "devcheck": True, "torch_densenet": True,
                    "drmad": True, "densenet": True, "densenet_cached": True}


# --------------------------------------------------------------------------- CUDA library linking
def _touch(path, target=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if target:
        os.symlink(target, path)
    else:
        with open(path, "w") as f:
            f.write("fake")


def test_find_and_link_cuda_libs_on_fake_tree(tmp_path):
    t = str(tmp_path)
    drv = f"{t}/usr/local/nvidia/lib64"
    _touch(f"{drv}/libcuda.so.580.159.04")
    _touch(f"{drv}/libcuda.so.1", "libcuda.so.580.159.04")
    _touch(f"{t}/usr/local/cuda/lib64/stubs/libcuda.so")          # link-time stub: never
    _touch(f"{t}/usr/local/cuda/lib64/stubs/libcublas.so.13")
    nv = f"{t}/site-packages/nvidia"
    for lib in ("libnvrtc.so.13", "libnvrtc-builtins.so.13.0", "libnvrtc.alt.so.13"):
        _touch(f"{nv}/cu13/lib/{lib}")
    _touch(f"{nv}/cu13/lib/libcublasLt.so.13")
    _touch(f"{nv}/cublas/lib/libcublas.so.12")
    _touch(f"{nv}/cublas/lib/libcublas.so.13")
    dirs = [f"{t}/usr/local/cuda/lib64/stubs", drv] + gr.nvidia_wheel_lib_dirs([nv])
    assert f"{nv}/cu13/lib" in dirs and f"{nv}/cublas/lib" in dirs
    found = gr.find_cuda_libs(dirs, ldconfig_text="")
    assert os.path.realpath(found["libcuda.so"]) == f"{drv}/libcuda.so.580.159.04"
    assert found["libnvrtc.so"] == f"{nv}/cu13/lib/libnvrtc.so.13"
    assert found["libcublas.so"] == f"{nv}/cublas/lib/libcublas.so.13"
    linked = gr.link_cuda_libs(found, f"{t}/links")
    for name in ("libcuda.so", "libnvrtc.so", "libcublas.so"):
        assert os.path.islink(f"{t}/links/{name}")
        assert os.path.realpath(f"{t}/links/{name}") == linked[name]
    # re-linking is idempotent, and a missing library leaves no link behind
    linked = gr.link_cuda_libs(dict(found, **{"libcublas.so": None}), f"{t}/links")
    assert "libcublas.so" not in linked and not os.path.lexists(f"{t}/links/libcublas.so")


def test_ldconfig_output_comes_first_and_skips_32bit(tmp_path):
    t = str(tmp_path)
    _touch(f"{t}/a/libcuda.so.1")
    _touch(f"{t}/b32/libcuda.so.1")
    _touch(f"{t}/c/libcuda.so.1")
    ldc = (f"3 libs found in cache\n\tlibcuda.so.1 (libc6) => {t}/b32/libcuda.so.1\n"
           f"\tlibcuda.so.1 (libc6,x86-64) => {t}/a/libcuda.so.1\n")
    assert gr.find_cuda_libs([f"{t}/c"], ldc)["libcuda.so"] == f"{t}/a/libcuda.so.1"
    assert gr.find_cuda_libs([f"{t}/missing"], "")["libcuda.so"] is None


def test_find_cuda_include(tmp_path):
    _touch(f"{tmp_path}/nv/cu13/include/cuda.h")
    assert gr.find_cuda_include([f"{tmp_path}/none", f"{tmp_path}/nv/*/include"]) == f"{tmp_path}/nv/cu13/include"


def test_build_env_sets_paths_and_flags():
    env = gr.build_env("/tmp/P", "/tmp/S", "/repo", "/tmp/L", ["/x/lib"], "/cuda/include", None, "/tmp/C", True,
                       base_env={"THEANO_FLAGS": "optimizer=fast_compile,gcc__cxxflags=-O0", "PYTHONHOME": "/bad",
                                 "LD_LIBRARY_PATH": "/old"})
    assert "PYTHONHOME" not in env
    assert env["LD_LIBRARY_PATH"].split(":") == ["/tmp/L", "/tmp/P/usr/lib", "/tmp/P/usr/lib/x86_64-linux-gnu",
                                                 "/x/lib", "/old"]
    assert env["PYTHONPATH"] == "/tmp/S:/repo"
    assert env["HPO_THEANO_CACHE"] == "/tmp/C" and "HPO_DEVICE" not in env and "HPO_FLOATX" not in env
    assert env["THEANO_FLAGS"] == ("optimizer=fast_compile,gcc__cxxflags=-I/tmp/P/usr/include "
                                   "-L/tmp/P/usr/lib/x86_64-linux-gnu -L/tmp/P/usr/lib -I/cuda/include")
    assert "," not in env["THEANO_FLAGS"].split("gcc__cxxflags=")[1]


# --------------------------------------------------------------------------- running parts
def test_run_part_timeout_kills_process_group(tmp_path):
    log = str(tmp_path / "p.log")
    t = time.time()
    res = gr.run_part(["bash", "-c", "echo started; sleep 30 & sleep 30"], dict(os.environ), 1.0, log, str(tmp_path))
    assert time.time() - t < 10
    assert res["status"] == "timeout" and "started" in res["reason"]
    res = gr.run_part([sys.executable, "-c", "print('{\"x\": 1}'); raise SystemExit(3)"], dict(os.environ), 20, log,
                      str(tmp_path))
    assert res["status"] == "failed" and res["rc"] == 3 and res["figures"] == {"x": 1}


def test_driver_without_gpu_writes_report(tmp_path, monkeypatch):
    """The whole `run` on this machine (no GPU): fake parts, no bundle needed."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ)
    env.update({"HPO_CMD_INFO": f"{sys.executable} -c \"print('{{\\\"device\\\": \\\"cpu\\\"}}')\"",
                "HPO_CMD_SMOKE": "py311 -c pass", "HPO_CMD_DENSENET": "", "PATH": os.environ["PATH"]})
    r = subprocess.run([sys.executable, os.path.join(GPU, "gpu_report.py"), "run", "--work", str(work),
                        "--out", str(out), "--repo", ROOT, "--budget", "60"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "gpu_report.json").read_text())
    st = {p["name"]: p for p in rep["parts"]}
    if not rep["environment"]["gpu_present"]:
        assert st["info"]["status"] == "ok" and st["info"]["figures"] == {"device": "cpu"}
        assert st["smoke"]["status"] == "skipped" and st["smoke"]["reason"].startswith("no GPU")
    assert st["densenet"]["status"] == "skipped"
    assert r.stdout.strip().splitlines()[-1].startswith("summary:")
    assert len(os.listdir(out)) <= gr.MAX_OUT_FILES


# --------------------------------------------------------------------------- smoke reference
def test_conv_reference_matches_direct_loops():
    rng = np.random.default_rng(0)
    x, w, g = rng.standard_normal((2, 3, 5, 4)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal((2, 4, 5, 4))
    y, gx, gw = smoke.conv_reference(x, w, g)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    yd = np.zeros_like(y)
    for n in range(2):
        for o in range(4):
            for h in range(5):
                for v in range(4):
                    yd[n, o, h, v] = np.sum(xp[n, :, h:h + 3, v:v + 3] * w[o, :, ::-1, ::-1])
    np.testing.assert_allclose(y, yd, rtol=1e-12, atol=1e-12)
    # gradients: linearity in x and w (sum(y*g) is bilinear)
    dx, dw = rng.standard_normal(x.shape), rng.standard_normal(w.shape)
    f = lambda xx, ww: float(np.sum(smoke.conv_reference(xx, ww, g)[0] * g))
    assert np.isclose(f(x + dx, w) - f(x, w), np.sum(gx * dx), rtol=1e-10)
    assert np.isclose(f(x, w + dw) - f(x, w), np.sum(gw * dw), rtol=1e-10)


# --------------------------------------------------------------------------- bundle (when prepared)
needs_bundle = pytest.mark.skipif(not glob.glob(os.path.join(BUNDLE, "debs", "python3.11-minimal_*.deb")),
                                  reason="gpu_bundle/ absent (run scripts/gpu/prepare.sh)")


@needs_bundle
def test_extract_deb_matches_dpkg(tmp_path):
    deb = glob.glob(os.path.join(BUNDLE, "debs", "libgpuarray3_*.deb"))[0]
    names = gr.extract_deb(deb, str(tmp_path / "py"))
    assert any(n.endswith("libgpuarray.so.3.0") for n in names)
    if shutil.which("dpkg"):
        subprocess.run(["dpkg", "-x", deb, str(tmp_path / "dp")], check=True)
        walk = lambda d: sorted(os.path.relpath(os.path.join(r, f), d) for r, ds, fs in os.walk(d) for f in fs + ds)
        assert walk(str(tmp_path / "py")) == walk(str(tmp_path / "dp"))


@needs_bundle
def test_bundled_python_starts_from_unpacked_folder(tmp_path):
    p = str(tmp_path / "py")
    for pkg in ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib"):
        gr.extract_deb(glob.glob(os.path.join(BUNDLE, "debs", f"{pkg}_*.deb"))[0], p)
    env = {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": f"{p}/usr/lib:{p}/usr/lib/x86_64-linux-gnu"}
    r = subprocess.run([f"{p}/usr/bin/python3.11", "-c", "import sys, json, ctypes; print(sys.version_info[:2], sys.prefix)"],
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(")")[0] == "(3, 11" and r.stdout.strip().endswith(f"{p}/usr")


@needs_bundle
def test_bundle_has_every_wheel_and_deb():
    names = [os.path.basename(f).lower().replace("-", "_") for f in glob.glob(os.path.join(BUNDLE, "*", "*"))]
    for want in ("numpy_1.23.5_cp311", "theano_pymc_1.1.2", "autograd_", "filelock_", "mako_", "markupsafe_",
                 "six_", "tqdm_", "python3_pygpu_", "libgpuarray3_", "libgpuarray_dev_", "python3.11_dev_",
                 "libpython3.11_dev_", "python3_distutils_", "python3_lib2to3_"):
        assert any(n.startswith(want) for n in names), want


def test_missing_system_libs():
    ldc = "\tlibfoo.so.8 (libc6,x86-64) => /nowhere/libfoo.so.8\n"
    assert gr.missing_system_libs(["libfoo.so.8", "libc.so.6", "libsurely_absent_xyz.so.9"], ldc) == \
        ["libsurely_absent_xyz.so.9"]
