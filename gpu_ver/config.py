"""The one place that sets Theano's flags, before Theano is imported.

Theano reads ``THEANO_FLAGS`` once, at ``import theano``; a flag set later has
no effect. Every module of ``gpu_ver`` that needs Theano therefore obtains it
from ``load()`` (never ``import theano`` at the top level before ``load`` ran),
and ``load`` refuses a second call that asks for other settings.

Settings, by precedence (option > environment > default):

- device:  ``auto`` | ``cpu`` | ``cuda`` | ``opencl``, or a specific GPU such as
  ``cuda1`` or ``opencl0:1`` (platform:device). Option ``device=``, env ``HPO_DEVICE``,
  default ``auto`` = the first CUDA device when pygpu (libgpuarray) sees one, else
  ``cpu``; ``auto`` never picks OpenCL (pocl's OpenCL device on a CPU is slower than
  the C backend; OpenCL is for AMD/Intel GPUs and for testing the GPU path). Asking
  for a GPU that is not there raises ``ConfigError`` *before* Theano is imported. On a
  GPU device ``load`` installs ``gpu_ver/theano_fixes.py`` (Theano-PyMC's gpuarray
  layer does not run without it) and sets ``dnn__enabled=False`` (Theano-PyMC 1.1.2
  calls cuDNN functions removed in cuDNN 8; docs/THEANO.md s.6).
- floatX:  ``float64`` | ``float32``.  Option ``floatX=``, env ``HPO_FLOATX``,
  default ``float64`` (the precision the cross-checks need; ``train`` and the
  benchmark ask for float32 explicitly).
- blas__ldflags: the OpenBLAS bundled in the scipy wheel
  (``-L<site-packages>/scipy.libs -l:libopenblasp-*.so``) when that file
  exists, else empty (Theano's NumPy C-API fallback). Env ``HPO_BLAS_LDFLAGS``
  overrides. Without this flag ``import theano`` crashes with numpy 1.23.5.
- base_compiledir: ``$HPO_THEANO_CACHE``, else
  ``${XDG_CACHE_HOME:-~/.cache}/hypergrad-hpo/theano``: a per-user cache the
  project owns, outside the repository, so the second run does not recompile.
- openmp: env ``HPO_OPENMP=0|1`` (default off, Theano's own default).
- cycle_detection: ``fast`` (Theano's default ``regular`` re-checks the whole
  graph for cycles at each in-place rewrite; on the DenseNet-40 training step
  that was a third of the optimiser's time). Not part of compiled-code keys.
- optimizer_excluding: ``merge3``, the last of Theano's four merge passes
  (after the in-place rewrites). On the reverse-over-reverse graph of a
  DenseNet it took 126 of 177 s of optimisation (DenseNet-16) to merge 4 of
  2,106 nodes; without it that compile takes 62 s.
- gcc__cxxflags: ``-g0`` first (Theano always passes ``-g``; the debug information
  is 40 % of gcc's time per module, 1.82 s -> 1.06 s on a 35 kB module, and nobody
  steps through generated Theano code), then ``-ffp-contract=off``: without it gcc
  contracts ``a * b + c`` into one fused multiply-add inside Theano's fused
  elementwise loops (Theano compiles for the host CPU, FMA included), so the same
  expression rounds differently depending on what the optimiser fused it with, and
  the gradient of a training step differed in the last bit from the same gradient
  inside the reverse step's graph (exact reversal, ``gpu_ver/reversible.py``, needs
  them equal). Every operation now rounds once, in any graph. A user's own
  gcc__cxxflags follow ours.

``load`` also registers our graph rewrites (``gpu_ver/rewrites.py``) and, on the
cpu device, a precompiled header of the includes every C module starts with
(``gpu_ver/pch.py``; ``HPO_PCH=0`` turns it off).

Entries of a user's ``THEANO_FLAGS`` that we do not set are kept; for the
keys above ours win (a user changes them through the ``HPO_*`` variables).
"""
from __future__ import annotations

import glob
import importlib.util
import logging
import os
import re
import sys
from dataclasses import asdict, dataclass

from gpu_ver import clcache, theano_fixes
from shared.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "opencl")   # kinds; a specific GPU: cuda1, opencl0:1
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda\d*|opencl(\d+:\d+)?)$")
FLOATX = ("float64", "float32")
ENV_DEVICE, ENV_FLOATX, ENV_CACHE = "HPO_DEVICE", "HPO_FLOATX", "HPO_THEANO_CACHE"
ENV_BLAS, ENV_OPENMP = "HPO_BLAS_LDFLAGS", "HPO_OPENMP"


@dataclass(frozen=True)
class Settings:
    """Resolved settings (what ``load`` applies)."""

    device: str          # Theano's device: "cpu", "cuda", "cuda1", "opencl0:0", ...
    floatX: str
    blas_ldflags: str
    base_compiledir: str
    openmp: bool

    def flags(self) -> dict:
        """Our Theano flags as a dict (double-underscore spelling)."""
        f = {"device": self.device, "floatX": self.floatX,
             "blas__ldflags": self.blas_ldflags,
             "base_compiledir": self.base_compiledir,
             "openmp": str(self.openmp),
             "cycle_detection": "fast",
             "optimizer_excluding": "merge3",
             "gcc__cxxflags": "-g0 -ffp-contract=off"}
        if device_kind(self.device) != "cpu":
            f["dnn__enabled"] = "False"
        return f


# --------------------------------------------------------------------------- devices
def device_kind(device: str) -> str:
    """``"cpu"``, ``"cuda"`` or ``"opencl"`` for a device name (``cuda1`` -> ``cuda``)."""
    d = str(device)
    return "cuda" if d.startswith(("cuda", "gpu")) else "opencl" if d.startswith("opencl") else "cpu"


def on_gpu(theano) -> bool:
    """Does the loaded Theano run on a GPU device (CUDA or OpenCL)?"""
    return device_kind(theano.config.device) != "cpu"


def _device_index(device: str) -> tuple:
    """(platform, device) numbers of a GPU name: cuda -> (0, 0), cuda2 -> (0, 2), opencl0:1 -> (0, 1)."""
    kind, rest = device_kind(device), device[4:] if device.startswith("cuda") else device[6:]
    if kind == "cuda":
        return 0, int(rest or 0)
    plat, _, dev = rest.partition(":")
    return int(plat or 0), int(dev or 0)


def probe_gpu(kind: str = "cuda", platform: int = 0) -> tuple:
    """(count, reason): how many ``kind`` devices (CUDA, or OpenCL on ``platform``) pygpu
    sees, and a sentence saying so or why none. Never imports Theano."""
    if importlib.util.find_spec("pygpu") is None:
        return 0, "pygpu (libgpuarray's Python module) is not installed (scripts/opencl_setup.sh installs it)"
    what = "CUDA" if kind == "cuda" else f"OpenCL (platform {platform})"
    if kind == "opencl":
        clcache.install(default_cache_dir())      # before libgpuarray first opens OpenCL
    try:
        import pygpu.gpuarray as ga  # noqa: PLC0415 (optional dependency)
        if kind == "opencl" and platform >= int(ga.count_platforms("opencl")):
            # libgpuarray aborts the process when asked for the devices of a missing platform
            return 0, f"pygpu sees {int(ga.count_platforms('opencl'))} OpenCL platform(s), not platform {platform}"
        n = int(ga.count_devices(kind, platform))
    except Exception as e:  # any failure of the optional backend means "no such device"
        msg = str(e).splitlines()[0] if str(e) else ""
        return 0, f"pygpu is installed but found no {what} device ({type(e).__name__}: {msg})"
    if n < 1:
        return 0, f"pygpu found no {what} device"
    return n, f"pygpu sees {n} {what} device(s)"


def resolve_device(device: str) -> str:
    """Theano's device for a requested one (``auto`` -> first CUDA device or ``cpu``;
    ``opencl`` -> ``opencl0:0``); ConfigError when the requested GPU is not there."""
    if device == "cpu":
        return "cpu"
    if device == "auto":
        return "cuda0" if probe_gpu("cuda")[0] else "cpu"
    name = "opencl0:0" if device == "opencl" else device
    kind, (plat, idx) = device_kind(name), _device_index(name)
    n, why = probe_gpu(kind, plat)
    if idx >= n:
        have = why if n == 0 else f"{why}, so there is no device {idx}"
        raise ConfigError(f"device {device} requested but not usable: {have}; "
                          f"use --device cpu (or {ENV_DEVICE}=cpu)")
    return name


def scipy_openblas_flags() -> str:
    """Link flags for the OpenBLAS inside the scipy wheel, or '' when absent."""
    spec = importlib.util.find_spec("scipy")
    if spec is None or not spec.submodule_search_locations:
        return ""
    libs = os.path.join(os.path.dirname(list(spec.submodule_search_locations)[0]), "scipy.libs")
    found = sorted(glob.glob(os.path.join(libs, "libopenblas*.so*")))
    if not found:
        return ""
    return f"-L{libs} -l:{os.path.basename(found[0])}"


def default_cache_dir() -> str:
    if os.environ.get(ENV_CACHE):
        return os.path.abspath(os.path.expanduser(os.environ[ENV_CACHE]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hypergrad-hpo", "theano")


def _choose(value, env, allowed, default, what):
    v = value if value is not None else (os.environ.get(env) or default)
    v = str(v).strip()
    if v not in allowed:
        src = f"{env}={v}" if value is None else f"--{what} {v}"
        raise ConfigError(f"{src}: {what} must be one of {', '.join(allowed)}")
    return v


def check_device(value: str, from_env: bool = False) -> str:
    """``value`` if it names a device (see ``DEVICES``), else ConfigError naming the option
    (or ``HPO_DEVICE`` when ``from_env``)."""
    v = str(value).strip()
    if not _DEVICE_RE.match(v):
        src = f"{ENV_DEVICE}={v}" if from_env else f"--device {v}"
        raise ConfigError(f"{src}: device must be one of {', '.join(DEVICES)}, "
                          f"or a specific GPU such as cuda1 or opencl0:1")
    return v


def _requested_device(device) -> str:
    if device is not None:
        return check_device(device)
    return check_device(os.environ.get(ENV_DEVICE) or "auto", from_env=True)


def resolve(device=None, floatX=None) -> Settings:
    """Settings from options, environment and defaults; raises ConfigError for a missing GPU."""
    dev = resolve_device(_requested_device(device))
    fx = _choose(floatX, ENV_FLOATX, FLOATX, "float64", "floatX")
    blas = os.environ.get(ENV_BLAS)
    blas = scipy_openblas_flags() if blas is None else blas
    omp = os.environ.get(ENV_OPENMP, "0").strip().lower() in ("1", "true", "yes")
    return Settings(dev, fx, blas, default_cache_dir(), omp)


# --------------------------------------------------------------------------- flags
def _canon(key: str) -> str:
    return key.strip().replace(".", "__")


# List-valued keys: the user's entries are kept, after ours (so a user's ``-g`` wins over our ``-g0``).
_JOINED = {"optimizer_excluding": ":", "gcc__cxxflags": " "}


def merge_flags(user: str, ours: dict) -> str:
    """User's THEANO_FLAGS with our keys removed (either spelling), then ours appended;
    for the list-valued keys in ``_JOINED`` the user's entries are kept in ours.

    Values containing commas cannot be expressed in THEANO_FLAGS; ours have none.
    """
    keep, ours = [], dict(ours)
    for item in (user or "").split(","):
        if not item.strip():
            continue
        key, _, value = item.partition("=")
        canon = _canon(key)
        if canon in _JOINED and canon in ours and value.strip():
            sep = _JOINED[canon]
            mine = [t for t in ours[canon].split(sep) if t]
            ours[canon] = sep.join(mine + [t for t in value.strip().split(sep) if t and t not in mine])
        elif canon not in ours:
            keep.append(item.strip())
    for k, v in ours.items():
        if "," in str(v):
            raise ConfigError(f"Theano flag {k}={v!r} contains a comma, which THEANO_FLAGS cannot carry")
        keep.append(f"{k}={v}")
    return ",".join(keep)


def _same_device(want: str, have: str) -> bool:
    """Is the loaded device ``have`` what ``want`` asks for (a kind matches any device of it)?"""
    if want in ("cuda", "opencl"):
        return device_kind(have) == want
    if "cpu" in (want, device_kind(have)):
        return want == have
    return device_kind(want) == device_kind(have) and _device_index(want) == _device_index(have)


def load(device=None, floatX=None):
    """Set our flags, import Theano once, and return the ``theano`` module.

    Idempotent: a later call with ``None`` (no preference) or the same values
    returns the loaded module; a call asking for a different device or floatX
    after Theano was imported raises ConfigError (Theano cannot change them).
    """
    if "theano" in sys.modules:
        theano = sys.modules["theano"]
        have = {"device": str(theano.config.device), "floatX": str(theano.config.floatX)}
        diff = {}
        if device not in (None, "auto") and not _same_device(check_device(device), have["device"]):
            diff["device"] = (device, have["device"])
        if floatX is not None and (fx := _choose(floatX, ENV_FLOATX, FLOATX, "float64", "floatX")) != have["floatX"]:
            diff["floatX"] = (fx, have["floatX"])
        if diff:
            desc = ", ".join(f"{k}={v} requested but Theano was already imported with {k}={h}"
                             for k, (v, h) in diff.items())
            raise ConfigError(f"{desc}; start a new process to change it")
        return theano
    s = resolve(device, floatX)
    os.makedirs(s.base_compiledir, exist_ok=True)
    os.environ["THEANO_FLAGS"] = merge_flags(os.environ.get("THEANO_FLAGS", ""), s.flags())
    logging.getLogger("theano.tensor.blas").addFilter(_drop_ldflags_warning)
    if device_kind(s.device) != "cpu":
        theano_fixes.install()
    import theano  # noqa: PLC0415 (must follow the flags)
    _cache_ops_without_props()
    from gpu_ver import pch, rewrites  # noqa: PLC0415 (need Theano imported)
    rewrites.register(theano)
    pch.install(theano)
    return theano


def _cache_ops_without_props() -> None:
    """Let Theano cache compiled modules that contain ops with empty ``__props__``.

    Theano-PyMC 1.1.2's ``CLinker.cmodule_key_`` appends ``node.op.__props__`` to the
    version tuple, and an empty tuple marks the key as unversioned, so any module holding
    Alloc, DeepCopyOp, Dot22, Softmax, ... is recompiled in every process (about 2 s each).
    Prefixing the props with a tag keeps them in the key and the key versioned; the ops'
    code versions still come from ``c_code_cache_version_apply``. A no-op if the source
    differs from the version this was written for.
    """
    import inspect  # noqa: PLC0415
    import textwrap  # noqa: PLC0415

    from theano.link.c import basic  # noqa: PLC0415
    if getattr(basic.CLinker.cmodule_key_, "_hpo_patched", False):
        return
    old = "version.append(node.op.__props__)"
    src = textwrap.dedent(inspect.getsource(basic.CLinker.cmodule_key_))
    if old not in src:
        return
    ns = {}
    exec(compile(src.replace(old, 'version.append(("__props__",) + tuple(node.op.__props__))'),
                 basic.__file__, "exec"), basic.__dict__, ns)
    ns["cmodule_key_"]._hpo_patched = True
    basic.CLinker.cmodule_key_ = ns["cmodule_key_"]


def _drop_ldflags_warning(record) -> bool:
    """Theano's BLAS check cannot parse ``-l:<file>`` and warns that it found no dynamic
    library; the library is linked all the same (docs/THEANO.md s.1), so drop that one message."""
    return not str(record.msg).startswith("We did not find a dynamic library")


def host_blas(ldflags: str) -> str:
    """The host BLAS that ``blas__ldflags`` links (the C backend's matrix products)."""
    if not ldflags:
        return "numpy C-API fallback (no BLAS linked)"
    lib = next((t[3:] for t in ldflags.split() if t.startswith("-l")), ldflags)
    return f"{'OpenBLAS' if 'openblas' in lib.lower() else 'BLAS'} ({lib.lstrip(':')})"


def gpu_blas(kind: str) -> str:
    """The BLAS libgpuarray uses on a device of ``kind`` (it dlopens the unversioned name)."""
    import ctypes.util  # noqa: PLC0415
    if kind == "cuda":
        return "cuBLAS (libcublas.so)"
    for name, lib in (("CLBlast", "clblast"), ("clBLAS", "clBLAS")):
        if ctypes.util.find_library(lib):
            return f"{name} (lib{lib}.so)"
    return "none found: libgpuarray needs libclblast.so for matrix products on OpenCL"


def info() -> dict:
    """What this process runs on: device and its name, floatX, BLAS, compiler, cache, versions,
    the GPU probes and which Theano fixes apply.

    Loads Theano with the default settings if no one did yet.
    """
    theano = load()
    cfg = theano.config
    kind = device_kind(cfg.device)
    n_cuda, why_cuda = probe_gpu("cuda")
    n_ocl, why_ocl = probe_gpu("opencl")
    name, blas = "host CPU (Theano's C backend)", host_blas(str(cfg.blas__ldflags))
    if kind != "cpu":
        from theano.gpuarray.type import get_context  # noqa: PLC0415
        name, blas = str(get_context(None).devname), gpu_blas(kind)
    backend = {"cpu": "C (CPU)", "cuda": "gpuarray (CUDA)", "opencl": "gpuarray (OpenCL)"}[kind]
    return {
        "device": str(cfg.device),
        "device_name": name,
        "backend": backend if cfg.cxx else "python (no C++ compiler found)",
        "floatX": str(cfg.floatX),
        "blas": blas,
        "blas_ldflags": str(cfg.blas__ldflags),
        "compiler": str(cfg.cxx),
        "gcc_cxxflags": str(cfg.gcc__cxxflags),
        "openmp": bool(cfg.openmp),
        "optimizer": str(cfg.optimizer),
        "base_compiledir": str(cfg.base_compiledir),
        "compiledir": str(cfg.compiledir),
        "theano_version": str(theano.__version__),
        "gpu_present": bool(n_cuda),
        "gpu_probe": why_cuda,
        "opencl_probe": why_ocl,
        "opencl_devices": n_ocl,
        "opencl_binary_cache": _cache_line(clcache.install(default_cache_dir())),
        "theano_fixes": theano_fixes.status() if kind != "cpu" else "not needed on the cpu device",
        "python": sys.version.split()[0],
    }


def _cache_line(st) -> str:
    return f"on: {st.reason}" if st.active else f"off: {st.reason}"


def settings_dict(s: Settings) -> dict:
    return asdict(s)
