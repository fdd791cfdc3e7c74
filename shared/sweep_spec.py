"""Sweep specifications: a TOML file expanded to runs, each named by a hash of its options.

A spec (read with the standard library's ``tomllib``) says what to run and over which grid::

    name = "hd-mnist"                  # required: the sweep's name
    description = "..."                # optional
    backend = "cpu_ver"                # cpu_ver | gpu_ver (default of every part)
    command = "adaptive"               # the backend's command (default of every part)
    seed_axis = "seed"                 # the axis aggregation averages over (default "seed")

    [options]                          # base options of every run: --batch 128 --lr 0.001 ...
    batch = 128
    lr = 1e-3
    [grid]                             # axes: every combination is one run
    method = ["hd", "sgdn-hd", "adam-hd"]
    seed = [0, 1, 2]

    [[parts]]                          # optional: several grids (e.g. two commands) in one sweep;
    name = "meta"                      # each part starts from the top-level backend, command,
    command = "meta"                   # options and grid and overrides what it names
    [parts.options] ...
    [parts.grid] ...

    [scales.tiny]                      # --scale tiny: options merged over every part's options,
    options = { steps = 50 }           # grid axes replacing the axes of the same name
    grid = { seed = [0, 1] }
    [scales.tiny.parts.meta]           # and for one part only (options it alone has)
    options = { meta_iters = 8 }
    [scales.paper] ...

    [[plots]]                          # read by shared/sweep_plots.py

An option ``key = value`` becomes ``--key value`` (underscores spelled as dashes); ``true``
gives the bare flag ``--key``, ``false`` leaves it out; a list value is one grid axis only
in ``[grid]``. A run's identity is the first 12 hex digits of the SHA-256 of its canonical
options (backend, command and the sorted option dict as JSON): the same run in two specs has
the same identity, and a changed option is a new run.

Nothing here imports either backend; the options are checked against the backend's own
parser by ``shared/sweep_cli.py`` before any work.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import ConfigError

BACKENDS = ("cpu_ver", "gpu_ver")
# options the sweep sets itself for every run (a spec giving them is refused)
RESERVED = ("out", "resume", "overwrite", "no_progress", "progress")
_TOP_KEYS = {"name", "description", "backend", "command", "seed_axis", "options", "grid", "parts", "scales",
             "plots", "metrics"}
_PART_KEYS = {"name", "backend", "command", "options", "grid"}
_SCALE_KEYS = {"options", "grid", "description", "parts"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Run:
    """One run of a sweep: ``backend command`` with ``options``; ``axes`` are its grid values
    (the part's name under ``part`` when the spec has parts), ``run_id`` the options' hash."""
    run_id: str
    part: str
    backend: str
    command: str
    options: dict
    axes: dict = field(default_factory=dict)

    @property
    def folder_name(self) -> str:
        """``<part>-<axis values>-<run_id>`` with characters unsafe in file names replaced."""
        words = [self.part] if self.part else []
        words += [str(v) for k, v in self.axes.items() if k != "part"]
        label = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", "-".join(words))[:80]
        return f"{label}-{self.run_id}" if label else self.run_id

    def argv(self) -> list:
        """The command's options as command-line words (``options_argv``)."""
        return options_argv(self.options)

    def to_json(self) -> dict:
        return {"run_id": self.run_id, "part": self.part, "backend": self.backend, "command": self.command,
                "options": self.options, "axes": self.axes}


@dataclass(frozen=True)
class Spec:
    """A parsed spec at one scale: its name, source file, scale, runs and the tables that
    aggregation reads (``plots``, ``metrics``, ``seed_axis``)."""
    name: str
    path: str
    scale: str | None
    description: str
    seed_axis: str
    runs: tuple
    plots: tuple
    metrics: tuple | None
    axes: tuple                 # every axis name over all parts, in order of first appearance


def canonical(backend: str, command: str, options: dict) -> str:
    """The text a run's identity hashes: backend, command and the options, sorted, as JSON."""
    return json.dumps({"backend": backend, "command": command, "options": options}, sort_keys=True,
                      separators=(",", ":"))


def run_id(backend: str, command: str, options: dict) -> str:
    """First 12 hex digits of SHA-256(``canonical``)."""
    return hashlib.sha256(canonical(backend, command, options).encode()).hexdigest()[:12]


def options_argv(options: dict) -> list:
    """``{"n_train": 200, "log_space": True}`` -> ``["--n-train", "200", "--log-space"]`` (sorted
    keys; ``True`` is the bare flag, ``False`` and ``None`` are left out)."""
    words = []
    for k in sorted(options):
        v = options[k]
        flag = "--" + k.replace("_", "-")
        if v is True:
            words.append(flag)
        elif v is False or v is None:
            continue
        else:
            words += [flag, _word(v)]
    return words


def _word(v) -> str:
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _fail(path, where, what):
    raise ConfigError(f"{path}: {where}: {what}")


def _table(path, where, v) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        _fail(path, where, f"expected a table, got {type(v).__name__}")
    return v


def _check_keys(path, where, d, allowed):
    bad = sorted(set(d) - allowed)
    if bad:
        _fail(path, where, f"unknown key {bad[0]!r} (known: {', '.join(sorted(allowed))})")


def _option_name(path, where, k) -> str:
    """The argparse destination of an option key; the sweep's own options are refused."""
    key = str(k).replace("-", "_")
    if key in RESERVED:
        _fail(path, f"{where}.{k}", "the sweep sets this option itself (each run gets its own folder)")
    return key


def _check_options(path, where, options) -> dict:
    out = {}
    for k, v in options.items():
        key = _option_name(path, where, k)
        if isinstance(v, (dict, list)):
            _fail(path, f"{where}.{k}", f"an option takes one value (a number, text or true/false), got "
                                        f"{type(v).__name__}{'; put values to sweep under [grid]' if isinstance(v, list) else ''}")
        out[key] = v
    return out


def _check_grid(path, where, grid) -> dict:
    out = {}
    for k, v in grid.items():
        key = _option_name(path, where, k)
        if not isinstance(v, list) or not v:
            _fail(path, f"{where}.{k}", "a grid axis is a non-empty list of values")
        if any(isinstance(x, (dict, list)) for x in v):
            _fail(path, f"{where}.{k}", "grid values are numbers, text or true/false")
        if len({json.dumps(x) for x in v}) != len(v):
            _fail(path, f"{where}.{k}", f"repeated value in {v!r}")
        out[key] = list(v)
    return out


def read_toml(path) -> dict:
    """The parsed TOML file; ConfigError naming the file for a missing or invalid one."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{p}: sweep spec not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a folder, not a sweep spec (a .toml file)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML ({e})") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror})") from None


def scales_of(doc: dict) -> tuple:
    """The scale names a spec defines."""
    return tuple((doc.get("scales") or {}).keys()) if isinstance(doc.get("scales"), dict) else ()


def load(path, scale: str | None = None) -> Spec:
    """The spec in ``path`` at ``scale`` (None: the base options alone), every part expanded.

    ConfigError (``file: where: what``) for unknown keys, a missing name, backend or command,
    an unknown scale, options the sweep sets itself, empty or repeated grid values, a scale's
    grid axis that no part has, and two runs with the same options. A grid axis replaces a
    base option of the same name.
    """
    doc = read_toml(path)
    _check_keys(path, "top level", doc, _TOP_KEYS)
    name = doc.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        _fail(path, "name", f"a sweep needs a name of letters, digits, '-', '_' or '.', got {name!r}")
    scales = _table(path, "scales", doc.get("scales"))
    if scale is not None and scale not in scales:
        raise ConfigError(f"--scale {scale}: {path} defines " + (
            f"the scales {', '.join(scales)}" if scales else "no scales ([scales.<name>] tables)"))
    sc = _table(path, f"scales.{scale}", scales.get(scale)) if scale else {}
    _check_keys(path, f"scales.{scale}", sc, _SCALE_KEYS)
    sc_opts = _check_options(path, f"scales.{scale}.options", _table(path, f"scales.{scale}.options",
                                                                        sc.get("options")))
    sc_grid = _check_grid(path, f"scales.{scale}.grid", _table(path, f"scales.{scale}.grid", sc.get("grid")))
    base = {"backend": doc.get("backend"), "command": doc.get("command"),
            "options": _check_options(path, "options", _table(path, "options", doc.get("options"))),
            "grid": _check_grid(path, "grid", _table(path, "grid", doc.get("grid")))}
    parts = doc.get("parts")
    if parts is None:
        parts = [{}]
    elif not isinstance(parts, list) or not parts or not all(isinstance(p, dict) for p in parts):
        _fail(path, "parts", "expected one or more [[parts]] tables")
    runs, seen, axes = [], {}, []
    for i, part in enumerate(parts):
        where = f"parts[{i}]" if "parts" in doc else "top level"
        _check_keys(path, where, part, _PART_KEYS)
        pname = part.get("name", "" if "parts" not in doc else None)
        if pname is None or not isinstance(pname, str) or (pname and not _NAME.match(pname)):
            _fail(path, f"{where}.name", f"each part needs a name of letters, digits, '-', '_' or '.', got {pname!r}")
        own = _table(path, f"scales.{scale}.parts.{pname}", (sc.get("parts") or {}).get(pname))
        _check_keys(path, f"scales.{scale}.parts.{pname}", own, {"options", "grid"})
        p_opts = {**sc_opts, **_check_options(path, f"scales.{scale}.parts.{pname}.options",
                                              _table(path, "options", own.get("options")))}
        p_grid = {**sc_grid, **_check_grid(path, f"scales.{scale}.parts.{pname}.grid",
                                           _table(path, "grid", own.get("grid")))}
        for r in _expand(path, where, pname, base, part, p_opts, p_grid):
            if r.run_id in seen:
                _fail(path, where, f"two runs with the same options ({seen[r.run_id]} and {r.folder_name})")
            seen[r.run_id] = r.folder_name
            axes += [k for k in r.axes if k not in axes]
            runs.append(r)
    for pname in _table(path, f"scales.{scale}.parts", sc.get("parts")):
        if pname not in [p.get("name") for p in parts]:
            _fail(path, f"scales.{scale}.parts.{pname}", "the spec has no part of this name")
    for k in sc_grid:
        if k not in axes:
            _fail(path, f"scales.{scale}.grid.{k}", "no part of the spec has this grid axis")
    plots = doc.get("plots", [])
    if not isinstance(plots, list) or not all(isinstance(p, dict) for p in plots):
        _fail(path, "plots", "expected [[plots]] tables")
    metrics = doc.get("metrics")
    if metrics is not None and (not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics)):
        _fail(path, "metrics", "expected a list of metric names (e.g. \"final_val_loss\", \"baseline.final_val_loss\")")
    seed_axis = doc.get("seed_axis", "seed")
    if not isinstance(seed_axis, str):
        _fail(path, "seed_axis", f"expected an axis name, got {seed_axis!r}")
    return Spec(name=name, path=str(path), scale=scale, description=str(doc.get("description", "")),
                seed_axis=seed_axis, runs=tuple(runs), plots=tuple(plots),
                metrics=None if metrics is None else tuple(metrics), axes=tuple(axes))


def _expand(path, where, pname, base, part, sc_opts, sc_grid):
    """The runs of one part: the top level's settings with the part's and the scale's over them."""
    backend = part.get("backend", base["backend"])
    command = part.get("command", base["command"])
    if backend not in BACKENDS:
        _fail(path, f"{where}.backend", f"choose from {', '.join(BACKENDS)}, got {backend!r}")
    if not isinstance(command, str) or not command:
        _fail(path, f"{where}.command", f"a run needs the backend's command (e.g. \"adaptive\"), got {command!r}")
    options = {**base["options"], **_check_options(path, f"{where}.options", _table(path, where, part.get("options")))}
    grid = {**base["grid"], **_check_grid(path, f"{where}.grid", _table(path, where, part.get("grid")))}
    options.update(sc_opts)
    grid.update({k: v for k, v in sc_grid.items() if k in grid})
    for k in grid:
        options.pop(k, None)            # an axis replaces the option of the same name
    names = list(grid)
    for values in itertools.product(*(grid[k] for k in names)):
        opts = {**options, **dict(zip(names, values))}
        axes = ({"part": pname} if pname else {}) | dict(zip(names, values))
        yield Run(run_id=run_id(backend, command, opts), part=pname, backend=backend, command=command,
                  options=opts, axes=axes)
