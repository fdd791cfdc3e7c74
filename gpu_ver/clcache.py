"""A disk cache of OpenCL kernel binaries, so a second process does not rebuild them.

On a GPU device every compiled Theano function builds its kernels through libgpuarray
when it is linked, also when ``gpu_ver/fncache.py`` loads the optimised graph from disk.
libgpuarray 0.7.6 caches compiled kernels on disk for CUDA (when Theano gives it a cache
path, which it does by default) but not for OpenCL: there each kernel goes through
``clCompileProgram`` + ``clLinkProgram`` in every process, and pocl runs clang's
preprocessor over each source before its own cache is consulted, so the second process
compiling a DenseNet step took 96-143 s against 176 s cold (docs/GPU.md s.6).

``gpu_ver/clcache.c`` is a small library with the SONAME ``libOpenCL.so``, the name
libgpuarray dlopens. Loaded first, it is what that dlopen returns; it stores each linked
program's binary under a key made of the device, the driver, the build options, the
header sources and the kernel source, and on a later build with exactly that key (the
key is kept in the file and compared in full) creates the program from the binary
instead. Every other OpenCL function resolves to the real ICD loader. The same source on
the same device and driver gives the same binary, so results do not change.

``install`` compiles the library with gcc once per source (into the Theano cache
folder), loads it and points it at ``<cache>/opencl-binaries``. It must run before
libgpuarray opens OpenCL, so ``gpu_ver.config.probe_gpu`` calls it before the first
OpenCL query. It changes nothing when OpenCL is already open, gcc or the ICD loader is
missing, or ``HPO_CLCACHE=0``; ``status`` says which.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

SOURCE = Path(__file__).with_name("clcache.c")
ENV_SWITCH = "HPO_CLCACHE"
STAT_NAMES = ("hits", "misses", "stores", "failures")


class Status(NamedTuple):
    active: bool
    reason: str            # why not, or where the binaries go
    library: str | None    # the compiled shim, when loaded


def _opencl_open() -> bool:
    """Whether this process has already mapped the OpenCL ICD loader."""
    try:
        with open("/proc/self/maps") as f:
            return any("libOpenCL.so" in line for line in f)
    except OSError:
        return False


def build(lib_dir: str) -> Path:
    """The shim compiled from ``clcache.c`` into ``lib_dir`` (once per source text)."""
    src = SOURCE.read_bytes()
    out = Path(lib_dir) / f"libhpoclcache-{hashlib.sha256(src).hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = ["gcc", "-shared", "-fPIC", "-O2", "-Wl,-soname,libOpenCL.so", "-o", tmp, str(SOURCE),
           "-Wl,--no-as-needed", "-l:libOpenCL.so.1", "-ldl", "-lpthread"]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


class _Shim(NamedTuple):
    so: ctypes.CDLL
    library: str
    bin_dir: str


#: The process's one loaded shim. A loaded library stays for the life of the process
#: whatever Python does, so this records a fact of the process rather than adding state.
_LOADED: list = []


def install(cache_root: str) -> Status:
    """Load the binary cache before libgpuarray opens OpenCL; binaries go under
    ``cache_root/opencl-binaries``. Idempotent; never raises."""
    if _LOADED:
        return Status(True, _LOADED[0].bin_dir, _LOADED[0].library)
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no"):
        return Status(False, f"{ENV_SWITCH}=0", None)
    if _opencl_open():
        return Status(False, "OpenCL was opened before the cache could be installed", None)
    bin_dir = os.path.join(cache_root, "opencl-binaries")
    try:
        lib = build(os.path.join(cache_root, "clcache-lib"))
        os.makedirs(bin_dir, exist_ok=True)
        so = ctypes.CDLL(str(lib))           # RTLD_LOCAL: no other library binds to it
        so.hpo_clcache_set_dir(bin_dir.encode())
    except (OSError, subprocess.CalledProcessError) as e:
        detail = (getattr(e, "stderr", "") or str(e)).strip().splitlines()
        return Status(False, f"could not build or load the shim: {detail[-1] if detail else e}", None)
    _LOADED.append(_Shim(so, str(lib), bin_dir))
    return Status(True, bin_dir, str(lib))


def stats() -> dict:
    """Counts of this process: binaries used (hits), kernels compiled and keyed (misses),
    binaries written (stores) and binaries that failed to load or write (failures)."""
    if not _LOADED:
        return dict.fromkeys(STAT_NAMES, 0)
    out = (ctypes.c_long * 4)()
    _LOADED[0].so.hpo_clcache_stats(out)
    return dict(zip(STAT_NAMES, map(int, out)))
