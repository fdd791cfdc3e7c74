"""The disk cache of OpenCL kernel binaries (``gpu_ver/clcache.py``, ``gpu_ver/clcache.c``).

Each device run is a subprocess: the cache is a library loaded before libgpuarray opens
OpenCL, once per process. Without an OpenCL device those tests skip, saying why; the build
of the library is checked wherever gcc and the OpenCL ICD loader are present.
"""
from __future__ import annotations

import ctypes.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_ver import clcache, config

ROOT = Path(__file__).resolve().parents[1]
N_OPENCL, WHY = config.probe_gpu("opencl")
needs_opencl = pytest.mark.skipif(N_OPENCL == 0, reason=f"no OpenCL device: {WHY}")
HAVE_LOADER = bool(shutil.which("gcc")) and ctypes.util.find_library("OpenCL") is not None


def run(code, *args, env=None, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not HAVE_LOADER, reason="needs gcc and the OpenCL ICD loader (libOpenCL.so.1)")
def test_the_library_answers_to_libgpuarrays_name_and_needs_the_real_loader(tmp_path):
    """libgpuarray dlopens ``libOpenCL.so``: the library must carry that SONAME (the dynamic
    loader then returns it) and depend on ``libOpenCL.so.1`` (where every function it does
    not define resolves)."""
    lib = clcache.build(str(tmp_path))
    assert clcache.build(str(tmp_path)) == lib                      # once per source
    dyn = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    assert "Library soname: [libOpenCL.so]" in dyn
    assert "Shared library: [libOpenCL.so.1]" in dyn


_PYGPU = r"""
import json, sys, numpy as np
from gpu_ver import clcache
st = clcache.install(sys.argv[1])
import pygpu, pygpu.gpuarray as ga
from pygpu import ndgpuarray
ctx = pygpu.init("opencl0:0")
a = ga.array(np.linspace(-3, 3, 37), context=ctx, cls=ndgpuarray)
out = np.asarray(a * a - a * 2.5 + 1.0)
print(json.dumps({"active": st.active, "reason": st.reason, "stats": clcache.stats(),
                  "out": [float(v).hex() for v in out]}))
"""


@needs_opencl
def test_a_second_process_builds_its_kernels_from_the_stored_binaries(tmp_path):
    """First process: every kernel compiled and its binary stored. Second: every kernel from
    a stored binary, nothing compiled, the same result bit for bit. A file whose stored key
    is not the kernel's (here: one byte of it changed) is a miss, compiled and rewritten."""
    first = run(_PYGPU, tmp_path)
    assert first["active"], first["reason"]
    s = first["stats"]
    assert s["misses"] > 0 and s["stores"] == s["misses"] and s["hits"] == 0 and s["failures"] == 0
    files = sorted((tmp_path / "opencl-binaries").glob("*.bin"))
    assert len(files) == s["stores"]
    second = run(_PYGPU, tmp_path)
    assert second["stats"] == {"hits": s["misses"], "misses": 0, "stores": 0, "failures": 0}
    assert second["out"] == first["out"]
    data = bytearray(files[0].read_bytes())
    data[40] ^= 1                                                   # inside the stored key
    files[0].write_bytes(bytes(data))
    third = run(_PYGPU, tmp_path)
    assert third["stats"] == {"hits": s["misses"] - 1, "misses": 1, "stores": 1, "failures": 0}
    assert third["out"] == first["out"]
    assert files[0].read_bytes() != bytes(data)                     # rewritten


_THEANO = r"""
import json, sys, numpy as np
from gpu_ver import clcache, config
clcache.install(sys.argv[1])
theano = config.load(device="opencl", floatX="float64")
tt = theano.tensor
x, w = tt.matrix("x"), tt.vector("w")
f = theano.function([x, w], tt.grad(tt.sum(tt.tanh(tt.dot(x, w)) ** 2), w))
rng = np.random.default_rng(0)
g = f(rng.standard_normal((5, 4)), rng.standard_normal(4))
print(json.dumps({"stats": clcache.stats(), "g": [float(v).hex() for v in g]}))
"""


@needs_opencl
def test_theano_functions_on_the_device_reuse_the_binaries(tmp_path):
    """A compiled Theano gradient on the OpenCL device: the second process builds none of its
    kernels from source and computes the same gradient bit for bit."""
    first = run(_THEANO, tmp_path / "bins")
    assert first["stats"]["stores"] > 0 and first["stats"]["failures"] == 0
    second = run(_THEANO, tmp_path / "bins")
    assert second["stats"]["misses"] == 0 and second["stats"]["hits"] >= first["stats"]["stores"]
    assert second["g"] == first["g"]


_LATE = r"""
import json, sys
import pygpu.gpuarray as ga
ga.count_devices("opencl", 0)                 # libgpuarray opens OpenCL here
from gpu_ver import clcache
st = clcache.install(sys.argv[1])
print(json.dumps({"active": st.active, "reason": st.reason, "stats": clcache.stats()}))
"""


@needs_opencl
def test_the_cache_stays_off_when_switched_off_or_installed_too_late(tmp_path):
    """``HPO_CLCACHE=0`` turns it off; after OpenCL was opened it cannot take effect and says so."""
    off = run(_PYGPU, tmp_path, env={"HPO_CLCACHE": "0"})
    assert not off["active"] and off["reason"] == "HPO_CLCACHE=0"
    assert off["stats"] == dict.fromkeys(clcache.STAT_NAMES, 0)
    late = run(_LATE, tmp_path)
    assert not late["active"] and "opened before" in late["reason"]
