"""The one place that sets Theano's flags, before Theano is imported.

Theano reads ``THEANO_FLAGS`` once, at ``import theano``; a flag set later has
no effect. Every module of ``gpu_ver`` that needs Theano therefore obtains it
from ``load()`` (never ``import theano`` at the top level before ``load`` ran),
and ``load`` refuses a second call that asks for other settings.

Settings, by precedence (option > environment > default):

- device:  ``cpu`` | ``cuda`` | ``auto``.  Option ``device=``, env ``HPO_DEVICE``,
  default ``auto`` = ``cuda`` when a usable GPU backend (pygpu with at least one
  CUDA device) imports, else ``cpu``. Asking for ``cuda`` without one raises
  ``ConfigError`` *before* Theano is imported. With ``cuda`` we also set
  ``dnn__enabled=False`` (Theano-PyMC 1.1.2 calls cuDNN functions removed in
  cuDNN 8; THEANO.md).
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
  steps through generated Theano code). A user's own gcc__cxxflags follow ours.

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
import sys
from dataclasses import asdict, dataclass

from shared.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
FLOATX = ("float64", "float32")
ENV_DEVICE, ENV_FLOATX, ENV_CACHE = "HPO_DEVICE", "HPO_FLOATX", "HPO_THEANO_CACHE"
ENV_BLAS, ENV_OPENMP = "HPO_BLAS_LDFLAGS", "HPO_OPENMP"


@dataclass(frozen=True)
class Settings:
    """Resolved settings (what ``load`` applies)."""

    device: str          # "cpu" or "cuda"
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
             "gcc__cxxflags": "-g0"}
        if self.device == "cuda":
            f["dnn__enabled"] = "False"
        return f


# --------------------------------------------------------------------------- probing
def probe_gpu() -> tuple:
    """(usable, reason): is a GPU backend usable? Never imports Theano.

    Usable means ``pygpu`` imports and reports at least one CUDA device.
    """
    if importlib.util.find_spec("pygpu") is None:
        return False, "pygpu (libgpuarray's Python module) is not installed"
    try:
        import pygpu.gpuarray as ga  # noqa: PLC0415 (optional dependency)
        n = int(ga.count_devices("cuda", 0))
    except Exception as e:  # any failure of the optional backend means "no GPU"
        return False, f"pygpu is installed but found no CUDA device ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if n < 1:
        return False, "pygpu found no CUDA device"
    return True, f"pygpu sees {n} CUDA device(s)"


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


def resolve(device=None, floatX=None) -> Settings:
    """Settings from options, environment and defaults; raises ConfigError for cuda without a GPU."""
    dev = _choose(device, ENV_DEVICE, DEVICES, "auto", "device")
    fx = _choose(floatX, ENV_FLOATX, FLOATX, "float64", "floatX")
    if dev != "cpu":
        ok, why = probe_gpu()
        if dev == "cuda" and not ok:
            raise ConfigError(f"device cuda requested but no usable GPU backend: {why}; "
                              f"use --device cpu (or {ENV_DEVICE}=cpu)")
        dev = "cuda" if ok else "cpu"
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


def _loaded_settings(theano) -> dict:
    dev = "cuda" if str(theano.config.device).startswith(("cuda", "gpu")) else "cpu"
    return {"device": dev, "floatX": str(theano.config.floatX)}


def load(device=None, floatX=None):
    """Set our flags, import Theano once, and return the ``theano`` module.

    Idempotent: a later call with ``None`` (no preference) or the same values
    returns the loaded module; a call asking for a different device or floatX
    after Theano was imported raises ConfigError (Theano cannot change them).
    """
    if "theano" in sys.modules:
        theano = sys.modules["theano"]
        have = _loaded_settings(theano)
        want = {}
        if device not in (None, "auto"):
            want["device"] = _choose(device, ENV_DEVICE, DEVICES, "auto", "device")
        if floatX is not None:
            want["floatX"] = _choose(floatX, ENV_FLOATX, FLOATX, "float64", "floatX")
        diff = {k: (v, have[k]) for k, v in want.items() if have[k] != v}
        if diff:
            desc = ", ".join(f"{k}={v} requested but Theano was already imported with {k}={h}"
                             for k, (v, h) in diff.items())
            raise ConfigError(f"{desc}; start a new process to change it")
        return theano
    s = resolve(device, floatX)
    os.makedirs(s.base_compiledir, exist_ok=True)
    os.environ["THEANO_FLAGS"] = merge_flags(os.environ.get("THEANO_FLAGS", ""), s.flags())
    logging.getLogger("theano.tensor.blas").addFilter(_drop_ldflags_warning)
    if s.device == "cuda":
        _install_gpuarray_patches()
    import theano  # noqa: PLC0415 (must follow the flags)
    _cache_ops_without_props()
    _finish_gpu_init(theano)
    from gpu_ver import pch, rewrites  # noqa: PLC0415 (need Theano imported)
    rewrites.register(theano)
    pch.install(theano)
    return theano


# Theano-PyMC 1.1.2 added an ``fgraph`` first argument to most of gpuarray's lifting
# optimisers (``def local_gpua_dot22(fgraph, op, context_name, inputs, outputs)``) but not
# to the two places that call them (``op_lifter``'s ``local_opt`` and ``GraphToGPU``), nor
# to a few optimisers it left with the old signature; every lift then fails with
# "missing 1 required positional argument: 'outputs'" and nothing moves to the GPU (seen
# on an H100). These source patches route both calls through ``_hpo_lift``, which passes
# ``fgraph`` to the functions that take it. Applied only when the CUDA device is used.
_LIFT_HELPER = '''

_hpo_arity = {}


def _hpo_lift(call, target, fgraph, *args):
    f = getattr(target, "fn", target)
    n = _hpo_arity.get(f)
    if n is None:
        import inspect
        try:
            n = _hpo_arity[f] = len(inspect.signature(f).parameters)
        except (TypeError, ValueError):
            n = _hpo_arity[f] = len(args)
    return call(fgraph, *args) if n == len(args) + 1 else call(*args)
'''
_GPUARRAY_PATCHES = {
    "theano.gpuarray.opt_util": [
        ("new_op = maker(node.op, context_name, node.inputs, node.outputs)",
         "new_op = _hpo_lift(maker, maker, fgraph, node.op, context_name, node.inputs, node.outputs)")],
    "theano.gpuarray.opt": [
        ("new_ops = lopt.transform(\n                        node.op,",
         "new_ops = _hpo_lift(lopt.transform, lopt, fgraph,\n                        node.op,")],
}


def _install_gpuarray_patches() -> None:
    """Install (once) an import hook that applies ``_GPUARRAY_PATCHES`` to Theano's source."""
    import importlib.machinery  # noqa: PLC0415

    if any(type(f).__name__ == "_GpuarrayPatchFinder" for f in sys.meta_path):
        return

    class _Loader(importlib.machinery.SourceFileLoader):
        def get_code(self, fullname):
            src = self.get_data(self.path).decode("utf-8")
            for old, new in _GPUARRAY_PATCHES[fullname]:
                if old in src:
                    src = src.replace(old, new)
            return compile(src + _LIFT_HELPER, self.path, "exec", dont_inherit=True)

    class _GpuarrayPatchFinder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name not in _GPUARRAY_PATCHES:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is not None and spec.origin and spec.origin.endswith(".py"):
                spec.loader = _Loader(name, spec.origin)
            return spec

    sys.meta_path.insert(0, _GpuarrayPatchFinder())


def _finish_gpu_init(theano) -> None:
    """Complete Theano-PyMC 1.1.2's ``gpuarray.use`` after its name clash.

    ``theano/gpuarray/__init__.py`` imports ``optdb`` from ``theano.compile`` and then a
    submodule of its own called ``optdb`` replaces that name, so ``use(device)`` fails
    right after initialising the device ("module 'theano.gpuarray.optdb' has no attribute
    'add_tags'", logged as "Could not initialize pygpu"): the context exists but no
    optimisation moves computations to the GPU (seen on an H100: every op stayed on the
    CPU). This does the two steps that were skipped, with the real optimiser database.
    """
    ga = sys.modules.get("theano.gpuarray")
    if ga is None or not getattr(ga, "pygpu_activated", False) or hasattr(ga.optdb, "add_tags"):
        return
    from theano.compile.mode import optdb  # noqa: PLC0415 (the SequenceDB)
    from theano.gpuarray.type import gpuarray_shared_constructor  # noqa: PLC0415
    optdb.add_tags("gpuarray_opt", "fast_run", "fast_compile")
    optdb.add_tags("gpua_scanOp_make_inplace", "fast_run")
    theano.compile.shared_constructor(gpuarray_shared_constructor)


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
    library; the library is linked all the same (THEANO.md), so drop that one message."""
    return not str(record.msg).startswith("We did not find a dynamic library")


def info() -> dict:
    """What this process runs on: device, floatX, BLAS, compiler, cache, versions, GPU probe.

    Loads Theano with the default settings if no one did yet.
    """
    theano = load()
    cfg = theano.config
    gpu, why = probe_gpu()
    try:
        blas_fallback = not bool(cfg.blas__ldflags)
    except AttributeError:
        blas_fallback = None
    return {
        "device": str(cfg.device),
        "backend": ("gpuarray (CUDA)" if str(cfg.device).startswith("cuda") else "C (CPU)")
                   if cfg.cxx else "python (no C++ compiler found)",
        "floatX": str(cfg.floatX),
        "blas_ldflags": str(cfg.blas__ldflags),
        "blas": "numpy C-API fallback" if blas_fallback else "linked BLAS",
        "compiler": str(cfg.cxx),
        "gcc_cxxflags": str(cfg.gcc__cxxflags),
        "openmp": bool(cfg.openmp),
        "optimizer": str(cfg.optimizer),
        "base_compiledir": str(cfg.base_compiledir),
        "compiledir": str(cfg.compiledir),
        "theano_version": str(theano.__version__),
        "gpu_present": bool(gpu),
        "gpu_probe": why,
        "python": sys.version.split()[0],
    }


def settings_dict(s: Settings) -> dict:
    return asdict(s)
