"""A sweep's table: mean and spread over seeds of each configuration's final figures.

A configuration is a run's grid values without the seed axis (the spec's ``seed_axis``,
default ``seed``), its part included. For every metric the table gives the mean over the
configuration's done runs and the sample standard deviation (``std``, ddof 1; 0 for one
seed), with ``seeds`` the number of runs averaged:

    mean = (1/n) sum_i m_i,        std = sqrt( sum_i (m_i - mean)^2 / (n - 1) )

Metrics: the spec's ``metrics`` list (dotted names reach into one level of a dict, e.g.
``baseline.final_val_loss``, ``cosine_drmad_vs_exact.l2``), or by default every number
the runs' results.json hold at the top level or one dict down, except timings (``*_s``,
``seconds``) and counters. ``seeds`` counts the configuration's done runs; a missing, null
or non-finite value is left out of its metric's mean (an empty cell when no run has it).

``aggregate`` prints the table, writes ``summary.csv`` (full precision) and returns the
rows for results.json; ``draw`` makes the spec's plots (``shared/sweep_plots.py``).
"""
from __future__ import annotations

import math
from pathlib import Path

from shared import summary
from shared.records import RESULTS_FILE, read_results, write_text_atomic

SUMMARY_FILE = "summary.csv"
SKIPPED_METRICS = ("steps_done", "n_projected", "buffer_bits", "quantiles", "blocks", "learned")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def value(metrics: dict, name: str):
    """``metrics[name]``, or ``metrics[a][b]`` for ``name = "a.b"`` (None when absent)."""
    if name in metrics:
        return metrics[name]
    head, _, tail = name.partition(".")
    sub = metrics.get(head)
    return sub.get(tail) if isinstance(sub, dict) and tail else None


def default_metrics(results: list) -> list:
    """Every numeric metric (top level or one dict down) of the runs, in order of first
    appearance, ``final_*`` first; timings and counters left out."""
    names = []
    for d in results:
        m = d.get("metrics") or {}
        flat = summary._flat({k: v for k, v in m.items() if k not in SKIPPED_METRICS}, keep=_number)
        names += [k for k in flat if k not in names and not _timing(k)]
    first = [n for n in names if n.split(".")[-1].startswith("final_")]
    return first + [n for n in names if n not in first]


def _timing(name: str) -> bool:
    last = name.split(".")[-1]
    return last.endswith("_s") or last == "seconds" or last in SKIPPED_METRICS


def done_runs(folder, manifest) -> list:
    """``(entry, results)`` of every done run whose results.json reads."""
    out = []
    for e in manifest["runs"].values():
        p = Path(folder) / e["folder"] / RESULTS_FILE
        if e["state"] == "done" and p.is_file():
            out.append((e, read_results(p)))
    return out


def configuration(entry: dict, seed_axis: str) -> tuple:
    """The grid values of a run without the seed axis, as sorted-free ordered pairs."""
    return tuple((k, v) for k, v in entry["axes"].items() if k != seed_axis)


def mean_std(values) -> tuple:
    """``(mean, sample std)`` of the finite numbers in ``values`` (``(None, None)`` if none)."""
    xs = [float(v) for v in values if _number(v) and math.isfinite(v)]
    if not xs:
        return None, None
    m = math.fsum(xs) / len(xs)
    s = math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def table(spec, runs: list) -> tuple:
    """``(columns, rows)``: one row per configuration, in the order of the spec's runs."""
    metrics = list(spec.metrics) if spec.metrics else default_metrics([d for _, d in runs])
    groups = {}
    for e, d in runs:
        groups.setdefault(configuration(e, spec.seed_axis), []).append(d.get("metrics") or {})
    axes = [a for a in spec.axes if a != spec.seed_axis]
    columns = [*axes, "seeds"]
    for m in metrics:
        columns += [f"{m} mean", f"{m} std"]
    rows = []
    for conf, ms in groups.items():
        c = dict(conf)
        row = [c.get(a) for a in axes]
        cells = []
        for m in metrics:
            cells += list(mean_std([value(x, m) for x in ms]))
        rows.append(row + [len(ms)] + cells)
    return columns, rows


def aggregate(spec, folder, manifest, *, echo=True) -> list:
    """Print the table (``echo``), write ``folder/summary.csv``; return the rows as dicts."""
    runs = done_runs(folder, manifest)
    columns, rows = table(spec, runs)
    write_text_atomic(Path(folder) / SUMMARY_FILE, summary.csv_text(columns, rows))
    if echo and rows:
        print(summary.format_table(columns, rows), end="")
    return [dict(zip(columns, r)) for r in rows]


def draw(spec, folder, manifest) -> list:
    """The spec's ``[[plots]]`` as PNG files in ``folder``; returns their names."""
    from shared.sweep_plots import draw_all  # noqa: PLC0415 (matplotlib only when there are plots)

    runs = done_runs(folder, manifest)
    return draw_all(spec, folder, runs) if spec.plots and runs else []
