"""A sweep's plots comparing methods, one PNG per ``[[plots]]`` table of the spec.

Two kinds, both averaging over the seed axis (mean line, band mean +- one sample standard
deviation, the spread ``shared/sweep_aggregate.py`` reports):

* ``kind = "curves"``: a per-step history of each run (``y``, e.g. ``val_loss``, against
  ``x``, e.g. ``step``; without ``x`` the index, e.g. the meta-iteration), one line per
  configuration, one panel per value of ``panel``; ``baseline = "baseline"`` adds the plain
  optimiser each adaptive run carries (``baseline.<y>``) as a dashed line of the same colour.
  Runs of one configuration are averaged over their common length.
* ``kind = "axes"``: a final figure (``y``, e.g. ``cosine_drmad_vs_exact.lr``) as a function of
  a grid axis ``x`` (e.g. ``K``; numbers on a numeric axis, ``log_x`` for a log scale, text as
  categories, drawn as points side by side without lines), one line per value of ``hue``
  (e.g. ``momentum``; other axes that vary also separate lines), one panel per ``panel``
  (e.g. ``iters``); error bars and band: one standard deviation over seeds.

Other keys: ``file`` (required, a ``.png`` name), ``title``, ``xlabel``, ``ylabel``, ``log_y``,
``where`` (a table ``{axis = value}`` keeping only those runs; those axes leave the legend), ``labels`` (axis value -> text for
legends and ticks). ``check_plot`` refuses an unknown key or kind, naming the spec and plot.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from shared.errors import ConfigError
from shared.records import save_figure
from shared.sweep_aggregate import configuration, value

KINDS = ("curves", "axes")
KEYS = {"kind", "file", "x", "y", "hue", "panel", "baseline", "title", "xlabel", "ylabel", "log_x", "log_y", "where",
        "labels"}


def check_plot(spec, i: int, p: dict) -> None:
    """ConfigError naming ``spec.path``, ``plots[i]`` and the problem."""
    where = f"{spec.path}: plots[{i}]"
    bad = sorted(set(p) - KEYS)
    if bad:
        raise ConfigError(f"{where}: unknown key {bad[0]!r} (known: {', '.join(sorted(KEYS))})")
    if p.get("kind") not in KINDS:
        raise ConfigError(f"{where}: kind must be one of {', '.join(KINDS)}, got {p.get('kind')!r}")
    f = p.get("file")
    if not isinstance(f, str) or not f.endswith(".png") or "/" in f or f in ("", ".png"):
        raise ConfigError(f"{where}: file must be a name ending in .png, got {f!r}")
    if not isinstance(p.get("y"), str):
        raise ConfigError(f"{where}: y must name a metric, got {p.get('y')!r}")
    axes = set(spec.axes)
    for key in ("hue", "panel") + (("x",) if p["kind"] == "axes" else ()):
        a = p.get(key)
        if a is not None and a not in axes:
            raise ConfigError(f"{where}: {key} = {a!r} is not a grid axis (axes: {', '.join(spec.axes)})")
    if p["kind"] == "axes" and p.get("x") is None:
        raise ConfigError(f"{where}: an 'axes' plot needs x, a grid axis")
    for a in (p.get("where") or {}):
        if a not in axes:
            raise ConfigError(f"{where}: where.{a} is not a grid axis")


def _keep(runs, where: dict):
    return [(e, d) for e, d in runs if all(e["axes"].get(k) == v for k, v in (where or {}).items())]


def _implied(runs, seed_axis) -> tuple:
    """``("part",)`` when the other grid values already say which part a run belongs to (the part
    then neither names nor separates lines), else ``()``."""
    seen = {}
    for e, _ in runs:
        rest = tuple((k, v) for k, v in e["axes"].items() if k not in ("part", seed_axis))
        if seen.setdefault(rest, e["axes"].get("part")) != e["axes"].get("part"):
            return ()
    return ("part",)


def _text(v, labels) -> str:
    return str((labels or {}).get(str(v), v))


def _panels(runs, axis):
    vals = []
    for e, _ in runs:
        v = e["axes"].get(axis) if axis else None
        if v not in vals:
            vals.append(v)
    return vals


def _figure(n_panels: int):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    cols = min(n_panels, 3)
    rows = math.ceil(n_panels / cols)
    fig, axs = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    for ax in axs.flat[n_panels:]:
        ax.set_visible(False)
    return fig, list(axs.flat), plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _band(ax, x, ys, color, label, style="-"):
    """Mean line and a mean +- std band (no band for one run) of equally long curves ``ys``."""
    n = min(len(y) for y in ys)
    Y = np.array([np.asarray(y[:n], dtype=float) for y in ys])
    m = np.nanmean(Y, axis=0)
    ax.plot(np.asarray(x[:n], dtype=float), m, style, color=color, lw=1.6,
            label=f"{label} ({len(ys)} seed{'s' if len(ys) > 1 else ''})")
    if len(ys) > 1:
        s = np.nanstd(Y, axis=0, ddof=1)
        ax.fill_between(np.asarray(x[:n], dtype=float), m - s, m + s, color=color, alpha=0.2, lw=0)


def _label(conf: tuple, skip, labels) -> str:
    words = [_text(v, labels) if k in ("method", "part") else f"{k}={_text(v, labels)}" for k, v in conf
             if k not in skip]
    return ", ".join(words) or "all runs"


def _series(d, name):
    v = value(d.get("metrics") or {}, name)
    return v if isinstance(v, list) and v and all(isinstance(x, (int, float)) or x is None for x in v) else None


def curves(spec, p, runs, path) -> Path | None:
    runs = _keep(runs, p.get("where"))
    panels = _panels(runs, p.get("panel"))
    fig, axs, colors = _figure(len(panels))
    drawn = False
    for ax, pv in zip(axs, panels):
        sub = [(e, d) for e, d in runs if p.get("panel") is None or e["axes"].get(p["panel"]) == pv]
        groups = {}
        for e, d in sub:
            groups.setdefault(configuration(e, spec.seed_axis), []).append(d)
        for i, (conf, ds) in enumerate(groups.items()):
            color = colors[i % len(colors)]
            lab = _label(conf, (p.get("panel"), spec.seed_axis, *(p.get("where") or {}), *_implied(runs, spec.seed_axis)),
                         p.get("labels"))
            for prefix, style in (("", "-"), (p.get("baseline"), "--")):
                if prefix is None:
                    continue
                name = f"{prefix}.{p['y']}" if prefix else p["y"]
                ys = [y for y in (_series(d, name) for d in ds) if y]
                if not ys:
                    continue
                xs = _series(ds[0], f"{prefix}.{p['x']}" if prefix else p["x"]) if p.get("x") else None
                x = xs if xs else list(range(len(ys[0])))
                tag = lab if not prefix else f"{lab}: plain {value(ds[0]['metrics'], prefix + '.optimizer') or prefix}"
                _band(ax, x, ys, color, tag, style)
                drawn = True
        _decorate(ax, p, pv, p.get("xlabel") or p.get("x") or "iteration")
    return _save(fig, p, spec, path, drawn)


def axes(spec, p, runs, path) -> Path | None:
    runs = _keep(runs, p.get("where"))
    panels = _panels(runs, p.get("panel"))
    fig, axs, colors = _figure(len(panels))
    xs_all = _panels(runs, p["x"])
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs_all)
    order = sorted(xs_all) if numeric else xs_all
    drawn = False
    for ax, pv in zip(axs, panels):
        sub = [(e, d) for e, d in runs if p.get("panel") is None or e["axes"].get(p["panel"]) == pv]
        lines = {}
        for e, d in sub:
            key = tuple((k, v) for k, v in configuration(e, spec.seed_axis)
                        if k not in (p["x"], p.get("panel"), *_implied(runs, spec.seed_axis)))
            lines.setdefault(key, {}).setdefault(e["axes"][p["x"]], []).append(value(d.get("metrics") or {}, p["y"]))
        for i, (key, by_x) in enumerate(lines.items()):
            pts = [(xv, [v for v in by_x[xv] if isinstance(v, (int, float)) and v is not None]) for xv in order
                   if xv in by_x]
            pts = [(xv, vs) for xv, vs in pts if vs]
            if not pts:
                continue
            shift = 0.0 if numeric else 0.08 * (i - (len(lines) - 1) / 2)     # categories: side by side
            pos = np.array([float(xv) if numeric else order.index(xv) + shift for xv, _ in pts])
            m = np.array([np.mean(vs) for _, vs in pts])
            s = np.array([np.std(vs, ddof=1) if len(vs) > 1 else 0.0 for _, vs in pts])
            color = colors[i % len(colors)]
            n = max(len(vs) for _, vs in pts)
            ax.errorbar(pos, m, yerr=s if n > 1 else None, color=color, marker="o", ms=4, capsize=3,
                        lw=1.4 if numeric else 0, elinewidth=1.4,
                        label=f"{_label(key, tuple(p.get('where') or {}), p.get('labels'))} "
                              f"({n} seed{'s' if n > 1 else ''})")
            if n > 1 and numeric:
                ax.fill_between(pos, m - s, m + s, color=color, alpha=0.15, lw=0)
            drawn = True
        if numeric and p.get("log_x"):
            ax.set_xscale("log")
            ax.minorticks_off()
        if numeric:
            ax.set_xticks(order, [f"{v:g}" for v in order])
        else:
            ax.set_xticks(range(len(order)), [_text(v, p.get("labels")) for v in order])
        _decorate(ax, p, pv, p.get("xlabel") or p["x"])
    return _save(fig, p, spec, path, drawn)


def _decorate(ax, p, pv, xlabel):
    """Axis labels, the panel's title, grid and legend of one panel."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(p.get("ylabel", p["y"]))
    if p.get("log_y"):
        ax.set_yscale("log")
    if p.get("panel"):
        ax.set_title(f"{p['panel']} = {_text(pv, p.get('labels'))}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig, p, spec, path, drawn):
    import matplotlib.pyplot as plt  # noqa: PLC0415

    if not drawn:
        plt.close(fig)
        return None
    scale = f", scale {spec.scale}" if spec.scale else ""
    import textwrap  # noqa: PLC0415

    title = p.get("title", f"{spec.name}: {p['y']}") + scale
    fig.suptitle(textwrap.fill(title, width=int(fig.get_figwidth() * 12)), fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


def draw_all(spec, folder, runs) -> list:
    """Every plot of ``spec`` from the done ``runs``; the names of the files written (a plot
    with no data among the done runs is skipped)."""
    out = []
    for i, p in enumerate(spec.plots):
        check_plot(spec, i, p)
        made = (curves if p["kind"] == "curves" else axes)(spec, p, runs, Path(folder) / p["file"])
        if made is not None:
            out.append(p["file"])
    return out
