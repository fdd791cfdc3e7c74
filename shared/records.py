"""Run folders: results.json, the command line, checkpoints and figures.

Every command writes into one folder (``--out``, default
``runs/<command>-<YYYYmmdd-HHMMSS>``): ``results.json`` with the keys
``command``, ``versions``, ``config``, ``metrics`` and ``timings``,
``command.txt`` with the shell-quoted command line, PNG plots, and
checkpoints. Every write is atomic (temporary file in the same folder, fsync,
``os.replace``), so an interrupted run never leaves a half-written file.

JSON has no NaN or infinity: ``to_jsonable`` turns non-finite floats into
``null`` (``None``), and the writers use ``allow_nan=False`` so the files are
strict JSON that any reader accepts.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import numpy as np

from shared.errors import ConfigError, DataError

RESULTS_FILE = "results.json"
COMMAND_FILE = "command.txt"
DEFAULT_PACKAGES = ("numpy", "scipy", "autograd", "theano")
_META_KEY = "__meta__"
# Import name -> distribution names to try, for packages whose names differ.
_DISTRIBUTIONS = {"theano": ("Theano-PyMC", "Theano"), "sklearn": ("scikit-learn",)}


# ---------------------------------------------------------------------------
# Run folders

def default_run_dir(command, root="runs", now=None) -> Path:
    """``root/<command>-<YYYYmmdd-HHMMSS>`` (``now`` defaults to the current local time).

    If that folder already exists (two runs in the same second) a suffix
    ``-2``, ``-3``, ... is added so that runs never share a folder.
    """
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{command}-{stamp}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


# Files a command of this toolkit writes into its run folder: a folder holding one
# of them holds a run.
RUN_FILE_PATTERNS = (RESULTS_FILE, COMMAND_FILE, "checkpoint*.npz", "hypers.npz", "hypers.json",
                     "hypergradient.npz", "*.png", "summary.csv")
_REPLACE = set()     # run folders whose earlier run files go when the new run makes the folder


def run_files(folder) -> list:
    """Names of the run files (``RUN_FILE_PATTERNS``) in ``folder``, sorted; [] if it does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted({p.name for pat in RUN_FILE_PATTERNS for p in folder.glob(pat) if p.is_file()})


def replace_on_first_use(path) -> None:
    """Mark ``path`` (``--overwrite``): ``make_run_dir`` removes its run files before the
    new run writes there, so that an earlier run's files never mix with the new ones."""
    _REPLACE.add(Path(path).absolute())


def make_run_dir(path) -> Path:
    """Create ``path`` (and parents); fine if it already exists. The first call for a
    folder marked by ``replace_on_first_use`` removes the earlier run's files."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"{path}: cannot use as an output folder: a file is in the way") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot create the output folder ({e.strerror})") from None
    if path.absolute() in _REPLACE:
        _REPLACE.discard(path.absolute())
        for name in run_files(path):
            (path / name).unlink()
    return path


def versions(packages=DEFAULT_PACKAGES) -> dict:
    """Python's version and each package's installed version (``'absent'`` if not installed).

    Reads package metadata only; nothing is imported (importing Theano would
    compile its C modules).
    """
    out = {"python": platform.python_version()}
    for name in packages:
        out[name] = "absent"
        for dist in _DISTRIBUTIONS.get(name, (name,)):
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


# ---------------------------------------------------------------------------
# JSON

def to_jsonable(obj, _where="value"):
    """A copy of ``obj`` made of dict/list/str/int/float/bool/None only.

    numpy scalars and arrays become Python numbers and nested lists; tuples
    and sets become lists; Paths become strings; dict keys become strings;
    dataclasses become dicts; objects with a ``to_json()`` method are
    converted by it. Non-finite floats (NaN, +-inf) become ``None``. Anything
    else raises TypeError naming where it was found.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, np.bool_):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"{_where}: cannot store a numpy array of dtype {obj.dtype} as JSON")
        return to_jsonable(obj.tolist(), _where)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, f"{_where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{_where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        return [to_jsonable(v, f"{_where}[*]") for v in sorted(obj, key=repr)]
    if hasattr(obj, "to_json") and callable(obj.to_json):
        return to_jsonable(obj.to_json(), _where)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name), f"{_where}.{f.name}") for f in dataclasses.fields(obj)}
    raise TypeError(f"{_where}: cannot store an object of type {type(obj).__name__} as JSON")


def dumps(obj) -> str:
    """Strict, indented JSON text of ``to_jsonable(obj)``."""
    return json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"


@contextmanager
def atomic_open(path, mode="wb"):
    """Yield a temporary file beside ``path``; if the block completes, fsync it and rename it
    over ``path``; if the block raises, remove it and leave ``path`` as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (creating the folder if needed)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text_atomic(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(text.encode("utf-8"))
    return Path(path)


def write_json_atomic(path, obj) -> Path:
    """Write ``obj`` as strict JSON to ``path`` atomically.

    The text is built before any file is touched, so a serialisation error
    leaves an existing file untouched.
    """
    return write_text_atomic(path, dumps(obj))


def read_json(path):
    """Parse a JSON file; DataError naming the file if it is missing or invalid."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


# ---------------------------------------------------------------------------
# results.json

def write_results(run_dir, argv, config, metrics, timings, packages=DEFAULT_PACKAGES) -> Path:
    """Write ``run_dir/results.json`` and ``run_dir/command.txt``; return the results path.

    ``argv`` is the command as a list of strings (e.g. ``sys.argv``);
    ``command.txt`` holds it shell-quoted on one line (``shlex.join``).
    """
    run_dir = make_run_dir(run_dir)
    argv = [str(a) for a in argv]
    write_text_atomic(run_dir / COMMAND_FILE, shlex.join(argv) + "\n")
    return write_json_atomic(run_dir / RESULTS_FILE, {
        "command": argv, "versions": versions(packages), "config": config,
        "metrics": metrics, "timings": timings})


def read_results(run_dir) -> dict:
    """The parsed ``results.json`` of a run folder (or of the file itself)."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / RESULTS_FILE
    d = read_json(path)
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a JSON object, found {type(d).__name__}")
    return d


# ---------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(path, arrays: dict, meta: dict) -> Path:
    """Write ``arrays`` and ``meta`` to the ``.npz`` file ``path`` atomically.

    ``meta`` is stored as a JSON string (via ``to_jsonable``) in the entry
    ``__meta__``; arrays must have numeric or boolean dtypes so that the file
    loads without pickle.
    """
    path = Path(path)
    if _META_KEY in arrays:
        raise ConfigError(f"{path}: array name {_META_KEY!r} is reserved for the checkpoint's metadata")
    clean = {}
    for k, v in arrays.items():
        a = np.asarray(v)
        if a.dtype.kind not in "biufc":
            raise ConfigError(f"{path}: array {k!r} has dtype {a.dtype}; checkpoints hold numeric arrays only")
        clean[str(k)] = a
    clean[_META_KEY] = np.array(json.dumps(to_jsonable(meta), allow_nan=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        np.savez(f, **clean)
    return path


def load_checkpoint(path, expect: dict | None = None) -> tuple:
    """``(arrays, meta)`` from a checkpoint written by ``save_checkpoint``.

    DataError naming the file when it is missing or corrupt. ConfigError when
    ``meta`` disagrees with ``expect`` on any key given there (compared after
    the same JSON conversion, so tuples match lists), naming the key, the
    checkpoint's value and the expected one.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DataError(f"{path}: checkpoint not found") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {e})") from None
    if _META_KEY not in arrays:
        raise DataError(f"{path}: not a checkpoint of this toolkit (no {_META_KEY!r} entry)")
    try:
        meta = json.loads(str(arrays.pop(_META_KEY)))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: checkpoint metadata is not valid JSON ({e})") from None
    for key, want in (expect or {}).items():
        want_j = to_jsonable(want)
        if key not in meta:
            raise ConfigError(f"{path}: checkpoint has no {key!r} (expected {want_j!r}); "
                              "refusing to resume from a different model/config")
        if meta[key] != want_j:
            raise ConfigError(f"{path}: checkpoint {key} = {meta[key]!r}, expected {want_j!r}; "
                              "refusing to resume from a different model/config")
    return arrays, meta


def require_arrays(path, arrays: dict, names) -> None:
    """DataError naming ``path`` and the first of ``names`` missing from a loaded checkpoint's
    ``arrays`` (a file that loads but lacks an entry cannot be resumed from)."""
    missing = [n for n in names if n not in arrays]
    if missing:
        raise DataError(f"{path}: checkpoint has no {missing[0]!r} array"
                        f"{f' (and {len(missing) - 1} more missing)' if len(missing) > 1 else ''}; "
                        "it cannot be resumed from")


# ---------------------------------------------------------------------------
# Figures

def save_figure(fig, path) -> Path:
    """Write a matplotlib figure to the PNG file ``path`` atomically, then close it.

    Selects the Agg backend when pyplot has not been imported yet; never
    switches a backend that is already in use.
    """
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png")
    finally:
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None:
            plt.close(fig)
    return path
