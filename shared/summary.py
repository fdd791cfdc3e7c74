"""One table of several runs: the options that differ, then the final figures.

``python -m cpu_ver summarize RUN_DIR...`` and ``python -m gpu_ver summarize
RUN_DIR...`` (``shared/summarize_cli.py``) both use this module; it reads only
each folder's ``results.json`` (numpy, autograd and Theano are never imported).

Columns, in order:

* ``run``: the folder's name (its path when two folders share a name);
* ``command`` (``cpu_ver meta``, ``gpu_ver drmad``), then every ``config`` entry whose value differs between the runs
  (a nested entry such as ``data`` is split into ``data.<key>``); entries that are
  the same in every run, and the run folder itself (``out``), are left out;
* every scalar metric (a number, text or null; a dict of scalars such as
  ``hypergradient_norm`` gives ``hypergradient_norm.<group>``), in the order of
  first appearance, ``final_*`` first. Per-step histories (lists) are left out.

A run without a column's key has an empty cell.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from shared.errors import ConfigError, DataError
from shared.records import RESULTS_FILE, read_results

# config entries that describe where or how a run was recorded, not what was run
IGNORED_CONFIG = ("out", "overwrite", "progress", "no_progress", "resume")
# metrics that describe rather than measure (the learned hyperparameters' sizes)
IGNORED_METRICS = ("learned",)


def run_results(path) -> tuple:
    """``(folder, results)`` of one RUN_DIR; ConfigError naming it when it holds no results.json."""
    p = Path(path)
    if p.is_file() and p.name == RESULTS_FILE:
        p = p.parent
    if not (p / RESULTS_FILE).is_file():
        raise ConfigError(f"{path}: no {RESULTS_FILE} (not a run folder)")
    d = read_results(p)
    for key in ("config", "metrics"):
        if not isinstance(d.get(key, {}), dict):
            raise DataError(f"{p / RESULTS_FILE}: {key!r} is not a JSON object")
    return p, d


def _scalar(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _flat(d: dict, *, keep=_scalar) -> dict:
    """``{key: value}`` of the scalars of ``d``, one level of dicts flattened as ``key.sub``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update({f"{k}.{s}": w for s, w in v.items() if keep(w)})
        elif keep(v):
            out[k] = v
    return out


def _command_name(results: dict):
    """The sub-command of a run (``python -m cpu_ver meta ...`` -> ``meta``)."""
    argv = results.get("command")
    if isinstance(argv, list) and len(argv) > 3 and argv[:2] == ["python", "-m"]:
        return f"{argv[2]} {argv[3]}"
    return None


def _config_of(results: dict) -> dict:
    cfg = results.get("config") or {}
    flat = {"command": _command_name(results)}     # backend and sub-command, from the recorded argv
    for k, v in cfg.items():
        if k in IGNORED_CONFIG or k == "command" or k.startswith("_"):
            continue
        if isinstance(v, dict):
            flat.update({f"{k}.{s}": w for s, w in v.items()})
        else:
            flat[k] = v
    return flat


def _same(values) -> bool:
    texts = {json.dumps(v, sort_keys=True) for v in values}
    return len(texts) <= 1


def table(paths) -> tuple:
    """``(columns, rows)``: the header and one list of cells per run (None: no value)."""
    runs = [run_results(p) for p in paths]
    if not runs:
        raise ConfigError("summarize needs at least one RUN_DIR")
    names = [p.name for p, _ in runs]
    labels = [str(p) if names.count(p.name) > 1 else p.name for p, _ in runs]
    configs = [_config_of(d) for _, d in runs]
    metrics = [_flat({k: v for k, v in (d.get("metrics") or {}).items() if k not in IGNORED_METRICS})
               for _, d in runs]

    def ordered(dicts):
        keys = []
        for d in dicts:
            keys += [k for k in d if k not in keys]
        return keys

    cfg_keys = [k for k in ordered(configs)
                if not _same([c.get(k, "\0absent") for c in configs])]
    met_keys = ordered(metrics)
    met_keys = [k for k in met_keys if k.startswith("final_")] + [k for k in met_keys if not k.startswith("final_")]
    columns = ["run", *cfg_keys, *met_keys]
    rows = [[label, *[c.get(k) for k in cfg_keys], *[m.get(k) for k in met_keys]]
            for label, c, m in zip(labels, configs, metrics)]
    return columns, rows


def cell(v, *, precise=False) -> str:
    """The text of one cell: empty for None; floats with 5 significant digits on the terminal
    (``precise``: the shortest text that reads back as the same float, for CSV)."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if precise or not math.isfinite(v):
            return repr(v)
        return f"{v:.5g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, sort_keys=True)
    return str(v)


def format_table(columns, rows) -> str:
    """A fixed-width text table (numbers right-aligned), one line per run after the header."""
    texts = [[cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(t[i]) for t in texts]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) or r[i] is None for r in rows)
               for i in range(len(columns))]

    def line(cells):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *[line(t) for t in texts]]) + "\n"


def csv_text(columns, rows) -> str:
    """The table as CSV (full float precision, empty cells for missing values)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([cell(v, precise=True) for v in r])
    return buf.getvalue()
