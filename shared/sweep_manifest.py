"""``manifest.json``: the state of every run of a sweep, in the sweep folder.

Layout of a sweep folder (``--out``)::

    manifest.json        this file, rewritten atomically after every change of state
    command.txt          the sweep's command line
    runs/<name>/         one run folder per run (the command's results.json, plots, checkpoints)
    summary.csv, *.png   the aggregated table and plots (shared/sweep_aggregate.py)

The manifest holds the spec's name, file and scale and, per run identity
(``shared/sweep_spec.py``): its folder, backend, command, options and grid values, and
``state`` (``pending``, ``running``, ``done``, ``failed``), ``attempts``, ``error`` (the
reason of the last failure), ``worker``, ``launch`` (how its last attempt's process was
started: ``zygote`` or ``subprocess``, ``shared/sweep_exec.py``), ``zygote`` (for a
zygote's fork: ``machine`` or ``worker``, the machine's zygote or the worker's own) and ``seconds``. Only the sweep's driver writes it.

Rerunning a sweep into its folder keeps ``done`` runs whose ``results.json`` is there and
runs the rest again (a ``running`` run was cut off by a stopped driver). A spec whose runs
differ from the folder's is refused, naming the runs and options that differ; ``extend``
admits a spec that only adds runs.
"""
from __future__ import annotations

import json
from pathlib import Path

from shared.errors import ConfigError, DataError
from shared.records import RESULTS_FILE, read_json, write_json_atomic

MANIFEST_FILE = "manifest.json"
RUNS_FOLDER = "runs"
STATES = ("pending", "running", "done", "failed")
FORMAT = 1


def entry(run) -> dict:
    """A new manifest entry for ``run`` (a ``sweep_spec.Run``), pending."""
    return {"folder": f"{RUNS_FOLDER}/{run.folder_name}", "part": run.part, "backend": run.backend,
            "command": run.command, "options": run.options, "axes": run.axes, "state": "pending",
            "attempts": 0, "error": None, "worker": None, "launch": None, "zygote": None,
            "seconds": None}


def new(spec) -> dict:
    """The manifest of a sweep that has not started: every run pending."""
    return {"format": FORMAT, "spec": spec.name, "spec_file": spec.path, "scale": spec.scale,
            "runs": {r.run_id: entry(r) for r in spec.runs}}


def path_of(folder) -> Path:
    return Path(folder) / MANIFEST_FILE


def read(folder) -> dict | None:
    """The manifest in ``folder`` (None when there is none); DataError for a damaged one."""
    p = path_of(folder)
    if not p.is_file():
        return None
    m = read_json(p)
    if not isinstance(m, dict) or not isinstance(m.get("runs"), dict) or m.get("format") != FORMAT:
        raise DataError(f"{p}: not a sweep manifest of this toolkit (format {FORMAT})")
    for rid, e in m["runs"].items():
        if not isinstance(e, dict) or e.get("state") not in STATES:
            raise DataError(f"{p}: run {rid}: no valid state")
    return m


def write(folder, manifest: dict) -> Path:
    """Write the manifest atomically (a reader sees the old or the new file, never half of one)."""
    return write_json_atomic(path_of(folder), manifest)


def _label(e: dict) -> str:
    """``part: axis=value, ...`` of a manifest entry."""
    words = ", ".join(f"{k}={v}" for k, v in e["axes"].items() if k != "part") or "the single run"
    return f"{e['part']}: {words}" if e["part"] else words


def _option_changes(old: dict, new_runs: dict) -> str:
    """The options in which ``old`` differs from the new run with the same grid values ('' if none)."""
    twin = next((e for e in new_runs.values() if e["axes"] == old["axes"] and e["command"] == old["command"]), None)
    if twin is None:
        return ""
    a, b = old["options"], twin["options"]
    diff = [f"{k} {json.dumps(a.get(k))} -> {json.dumps(b.get(k))}" for k in sorted(set(a) | set(b))
            if a.get(k, "\0") != b.get(k, "\0")]
    return f"; changed: {', '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}" if diff else ""


def reconcile(old: dict, spec, folder, *, extend: bool) -> dict:
    """The manifest to continue with when ``folder`` already holds ``old``.

    The same spec name and scale are required. Runs of ``old`` that are ``done`` and still
    have their results.json stay done; ``running`` runs become pending (their attempts
    count), ``failed`` ones pending with their retries renewed. ConfigError when the spec no longer gives a run of ``old`` (an
    option or axis changed or was removed), or gives new runs without ``extend``.
    """
    where = path_of(folder)
    if old.get("spec") != spec.name:
        raise ConfigError(f"--out {folder} holds the sweep {old.get('spec')!r} ({where}), not {spec.name!r}; "
                          "choose another --out")
    if old.get("scale") != spec.scale:
        raise ConfigError(f"--out {folder} holds sweep {spec.name!r} at scale {old.get('scale')!r}, not "
                          f"{spec.scale!r}; choose another --out for another scale")
    fresh = new(spec)["runs"]
    removed = [rid for rid in old["runs"] if rid not in fresh]
    added = [rid for rid in fresh if rid not in old["runs"]]
    if removed:
        e = old["runs"][removed[0]]
        raise ConfigError(f"{spec.path}: changed since {where}: {len(removed)} run(s) there are no longer in the "
                          f"spec (first: {_label(e)}"
                          f"{_option_changes(e, fresh)}); restore the spec or choose another --out")
    if added and not extend:
        e = fresh[added[0]]
        raise ConfigError(f"{spec.path}: changed since {where}: {len(added)} new run(s) (first: "
                          f"{_label(e)}); pass --extend to add them to "
                          "this sweep, or choose another --out")
    runs = {}
    for rid, e in fresh.items():
        prev = old["runs"].get(rid)
        if prev is None:
            runs[rid] = e
            continue
        if prev["state"] == "done" and (Path(folder) / prev["folder"] / RESULTS_FILE).is_file():
            runs[rid] = prev
        elif prev["state"] == "failed":         # a rerun gives a failed run its retries again
            runs[rid] = {**prev, "state": "pending", "attempts": 0}
        else:                                   # cut off by a stopped driver: its attempts count
            runs[rid] = {**prev, "state": "pending"}
    return {**old, "spec_file": spec.path, "runs": runs}


def counts(manifest: dict) -> dict:
    """``{state: number of runs}`` for every state."""
    c = dict.fromkeys(STATES, 0)
    for e in manifest["runs"].values():
        c[e["state"]] += 1
    return c
