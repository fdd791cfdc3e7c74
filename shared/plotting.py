"""Figures both backends draw the same way (matplotlib, imported only when a figure is made).

* ``integer_axis``: ticks at whole numbers only (steps, meta-iterations, epochs);
* ``log10_image``: log10 of a heat map's values with the non-positive and non-finite
  entries masked (an L2 strength of 0 has no logarithm: it is drawn blank, and the
  colour bar spans the finite values only);
* ``set_log_scale``: a log axis only where the data span a decade or more (within a
  decade a log axis labels several ticks with the same rounded text);
* ``adaptive_figures``: curves.png, hyperparameters.png and hyper_heatmap.png of an
  ``adaptive`` run (``cpu_ver`` and ``gpu_ver``), titled with the method and the data.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib.pyplot, with the Agg backend unless pyplot is already in use."""
    import matplotlib  # noqa: PLC0415

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def integer_axis(ax, which="x") -> None:
    """Major ticks of ``ax``'s ``which`` axis at integers only (no 0.5 steps)."""
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    getattr(ax, f"{which}axis").set_major_locator(MaxNLocator(integer=True))


def log10_image(values):
    """``log10(values)`` as a masked array: entries <= 0 or non-finite are masked."""
    v = np.asarray(values, dtype=float)
    ok = np.isfinite(v) & (v > 0)
    out = np.full(v.shape, np.nan)
    out[ok] = np.log10(v[ok])
    return np.ma.masked_invalid(out)


def set_log_scale(ax, values, which="y") -> bool:
    """A log ``which`` axis when every value is positive and they span at least a decade;
    returns whether it was set (otherwise a linear axis, its labels written out in full,
    without an offset)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size and np.all(v > 0) and v.max() / v.min() >= 10:
        getattr(ax, f"set_{which}scale")("log")
        return True
    from matplotlib.ticker import ScalarFormatter  # noqa: PLC0415

    fmt = ScalarFormatter(useOffset=False)          # "0.0100002", not "2e-7" beside "+1e-2"
    getattr(ax, f"{which}axis").set_major_formatter(fmt)
    return False


def constant(q) -> bool:
    """Whether every entry of ``q`` is the same number (a hyperparameter the method never changed)."""
    q = np.asarray(q, dtype=float)
    return q.size == 0 or bool(np.nanmax(q) == np.nanmin(q))


def adaptive_figures(run_dir, res, base, method_name, base_name, data_label) -> list:
    """curves.png, hyperparameters.png, hyper_heatmap.png of an adaptive run; the names written.

    ``res``/``base``: the method's and the plain optimiser's logs (``step``, ``train_loss``,
    ``val_loss``, ``val_error``; ``res`` also ``lr_quantiles``, ``l2_quantiles``: logged step x
    block x quantile (0, .1, .5, .9, 1), and ``blocks``). A hyperparameter the method keeps
    fixed (HD methods' L2) gets no panel; the title says so."""
    from shared.records import save_figure  # noqa: PLC0415

    plt = pyplot()
    run_dir = Path(run_dir)
    title = f"{method_name}" + (f" vs {base_name}" if base is not None else "") + f" on {data_label}"
    steps = np.asarray(res["step"])
    blocks = list(res["blocks"])
    written = []

    fig, ax = plt.subplots(1, 3, figsize=(14, 4.2))
    for key, a, lab in (("train_loss", ax[0], "training loss (cross-entropy)"),
                        ("val_loss", ax[1], "validation loss (cross-entropy)"),
                        ("val_error", ax[2], "validation error (%)")):
        scale = 100.0 if key == "val_error" else 1.0
        runs = [(res, method_name, "-")] + ([(base, base_name, "--")] if base is not None else [])
        for r, name, style in runs:
            if key in r:
                a.plot(r["step"], scale * np.asarray(r[key], dtype=float), style, marker=".", label=name)
        if key != "val_error":
            set_log_scale(a, np.concatenate([np.asarray(r[key], dtype=float) for r, _, _ in runs if key in r]))
        a.set_xlabel("step")
        a.set_ylabel(lab)
        integer_axis(a)
        a.legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, run_dir / "curves.png")
    written.append("curves.png")

    hyper = [(k, lab) for k, lab in (("lr_quantiles", "learning rate"), ("l2_quantiles", "L2 strength"))
             if k in res and not constant(res[k])]
    fixed = [f"{lab} fixed at {np.asarray(res[k], dtype=float).ravel()[0]:g}"
             for k, lab in (("lr_quantiles", "learning rate"), ("l2_quantiles", "L2 strength"))
             if k in res and constant(res[k]) and np.size(res[k])]
    sub = title + (f"\n({'; '.join(fixed)}: not adapted by {method_name})" if fixed else "")
    if hyper:
        cmap = plt.get_cmap("viridis")
        fig, ax = plt.subplots(1, len(hyper), figsize=(6 * len(hyper), 4.8), squeeze=False)
        for (key, lab), a in zip(hyper, ax[0]):
            q = np.asarray(res[key], dtype=float)
            one_value = bool(np.all(q == q[:, :1, 2:3]))     # global granularity: one number per step
            for b, name in enumerate(blocks[:1] if one_value else blocks):
                col = cmap(b / max(len(blocks) - 1, 1))
                a.plot(steps, q[:, b, 2], color=col,
                       label="all layers (one value)" if one_value else name if len(blocks) <= 12 else None)
                if not one_value:
                    a.fill_between(steps, q[:, b, 1], q[:, b, 3], color=col, alpha=0.15)
            set_log_scale(a, q)
            a.set_xlabel("step")
            a.set_ylabel(lab if one_value else f"{lab} (median, 10-90% per layer)")
            integer_axis(a)
            if len(blocks) <= 12 or one_value:
                a.legend(fontsize=7)
            else:
                a.set_title(f"{len(blocks)} layers, colour = position (input dark, output light)", fontsize=8)
        fig.suptitle(sub)
        fig.tight_layout()
        save_figure(fig, run_dir / "hyperparameters.png")
        written.append("hyperparameters.png")

        fig, ax = plt.subplots(1, len(hyper), figsize=(6 * len(hyper), max(3.4, 0.18 * len(blocks) + 2.0)),
                               squeeze=False)
        for (key, lab), a in zip(hyper, ax[0]):
            img = log10_image(np.asarray(res[key], dtype=float)[:, :, 2].T)
            cm = plt.get_cmap("viridis").copy()
            cm.set_bad("white")
            half = (steps[1] - steps[0]) / 2 if len(steps) > 1 else 0.5
            im = a.imshow(img, aspect="auto", interpolation="nearest", origin="upper", cmap=cm,
                          extent=(steps[0] - half, steps[-1] + half, len(blocks) - 0.5, -0.5))
            a.set_yticks(range(len(blocks)))
            a.set_yticklabels(blocks, fontsize=6)
            a.set_xlabel("step")
            integer_axis(a)
            a.set_title(f"log10 median {lab}" + (" (blank: 0)" if np.ma.count_masked(img) else ""), fontsize=9)
            fig.colorbar(im, ax=a)
        fig.suptitle(sub)
        fig.tight_layout()
        save_figure(fig, run_dir / "hyper_heatmap.png")
        written.append("hyper_heatmap.png")
    return written


# --- hypergradients (``hypergrad``) -----------------------------------------------------

METHOD_LABELS = {"exact": "exact (reversible)", "drmad": "DrMAD"}


def hypergradient_per_block(hypers, name, grad):
    """(labels, sums): the hypergradient of group ``name`` summed over each parameter block
    (and over the steps for ``iter``/``iter_block``); one sum over all parameters for the
    ``scalar`` and ``iter`` shapes. A block's sum is the derivative with respect to adding
    the same amount to every entry of the group in that block."""
    from shared.hyperparams import units_of_block  # noqa: PLC0415

    layout, shape = hypers.layout, hypers.group(name).shape
    g = np.asarray(grad, dtype=float)
    if shape in ("scalar", "iter"):
        return ["all parameters"], np.array([g.sum()])
    if shape == "block":
        return list(layout.names), g
    if shape == "iter_block":
        return list(layout.names), g.sum(axis=0)
    if shape == "param":
        return list(layout.names), np.array([g[layout.slice(b)].sum() for b in range(layout.n_blocks)])
    ends = np.cumsum([units_of_block(s) for s in layout.shapes])            # unit
    return list(layout.names), np.array([g[e - units_of_block(s):e].sum() for e, s in zip(ends, layout.shapes)])


def hypergradient_figure(path, hypers, grads_by_method: dict, title: str = "") -> Path:
    """hypergradient.png: one row per hyperparameter group; left, the hypergradient summed
    per parameter block, one bar per method; right (for the per-step shapes), the
    hypergradient per training step summed over the blocks, one line per method."""
    from shared import records  # noqa: PLC0415

    plt = pyplot()
    names = [n for n in hypers.tuned if all(n in g for g in grads_by_method.values())]
    methods = list(grads_by_method)
    fig, axes = plt.subplots(max(len(names), 1), 2, figsize=(12, 2.9 * max(len(names), 1)), squeeze=False)
    width = 0.8 / max(len(methods), 1)
    for row, name in zip(axes, names):
        shape = hypers.group(name).shape
        for k, m in enumerate(methods):
            labels, sums = hypergradient_per_block(hypers, name, grads_by_method[m][name])
            x = np.arange(len(labels)) + (k - (len(methods) - 1) / 2) * width
            row[0].bar(x, sums, width, label=METHOD_LABELS.get(m, m), color=f"C{k}")
        row[0].set_xticks(range(len(labels))), row[0].set_xticklabels(labels)
        row[0].axhline(0, color="0.5", lw=0.8)
        how = {"scalar": "one value for all parameters", "iter": "summed over all steps",
               "iter_block": "summed per block, over all steps"}.get(shape, "summed per block")
        row[0].set_title(f"d(validation loss)/d {name} ({shape}): {how}", fontsize=10)
        row[0].set_ylabel(f"dL/d {name}")
        if shape in ("iter", "iter_block"):
            for k, m in enumerate(methods):
                g = np.asarray(grads_by_method[m][name], dtype=float)
                per_step = g if shape == "iter" else g.sum(axis=1)
                row[1].plot(np.arange(len(per_step)), per_step, marker=".", label=METHOD_LABELS.get(m, m),
                            color=f"C{k}")
            row[1].axhline(0, color="0.5", lw=0.8)
            row[1].set_xlabel("training step"), row[1].set_ylabel(f"dL/d {name}")
            row[1].set_title(f"d(validation loss)/d {name} per step (summed over blocks)", fontsize=10)
            integer_axis(row[1])
        else:
            row[1].set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.7 / fig.get_figheight() if len(methods) > 1 else 1))
    if len(methods) > 1:            # one legend for every panel, under the title
        fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", ncol=len(methods), fontsize=9,
                   bbox_to_anchor=(0.5, 1 - 0.35 / fig.get_figheight()), frameon=False)
    return records.save_figure(fig, path)


def save_hypergradients(path, grads_by_method: dict, names) -> Path:
    """hypergradient.npz: key ``METHOD/GROUP`` (e.g. ``exact/lr``) per method and group, the
    hypergradient with respect to the group's constrained values, in the group's shape."""
    import io  # noqa: PLC0415

    from shared.records import write_bytes_atomic  # noqa: PLC0415

    arrays = {f"{m}/{n}": np.asarray(g[n], dtype=float) for m, g in grads_by_method.items() for n in names if n in g}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path = Path(path)
    write_bytes_atomic(path, buf.getvalue())
    return path


# --- learned momentum schedule and initial scales (``meta``) ------------------------------

SCHEDULE_GROUPS = ("momentum", "init_scale")


def _describe_start(start, name) -> str:
    """'started at 0.9' when the starting values of ``name`` were all the same."""
    if start is None or name not in start:
        return ""
    v = np.asarray(start.value(name), dtype=float)
    return f", started at {v.flat[0]:.3g}" if v.size and np.all(v == v.flat[0]) else ""


SHAPE_WORDS = {"scalar": "one value", "block": "per block", "unit": "mean per block", "param": "mean per block",
               "iter": "per step", "iter_block": "per step and block"}


def schedules_figure(path, hypers, start=None, title: str = ""):
    """schedules.png: the learned momentum schedule and the initial weight scales, for the
    groups of ``SCHEDULE_GROUPS`` that ``hypers`` tunes; ``start`` (the hyperparameters
    before meta-optimisation) is drawn beside them where it is not a heat map. Returns the
    path, or None when neither group is tuned (no figure)."""
    from shared import records  # noqa: PLC0415

    names = [n for n in SCHEDULE_GROUPS if n in hypers.tuned]
    if not names:
        return None
    plt = pyplot()
    layout = hypers.layout
    fig, axes = plt.subplots(1, len(names), figsize=(6.2 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        shape, v = hypers.group(name).shape, np.asarray(hypers.value(name), dtype=float)
        what = "momentum" if name == "momentum" else "initial weight scale"
        if shape == "iter_block":
            im = ax.imshow(v.T, aspect="auto", interpolation="nearest", cmap="viridis")
            ax.set_yticks(range(layout.n_blocks)), ax.set_yticklabels(layout.names)
            ax.set_xlabel("training step"), fig.colorbar(im, ax=ax, label=what)
            integer_axis(ax)
        elif shape == "iter":
            ax.plot(np.arange(len(v)), v, marker=".", label="learned")
            if start is not None and name in start:
                ax.plot(np.arange(len(v)), start.value(name), ls="--", color="0.5", label="start")
                ax.legend(fontsize=8)
            ax.set_xlabel("training step"), ax.set_ylabel(what)
            integer_axis(ax)
        else:
            labels = ["all parameters"] if shape == "scalar" else list(layout.names)
            vals = np.atleast_1d(v) if shape in ("scalar", "block") else np.array(
                [hypers.per_param(name)[layout.slice(b)].mean() for b in range(layout.n_blocks)])
            x = np.arange(len(labels))
            bars = ax.bar(x, vals, 0.6, label="learned")
            ax.bar_label(bars, labels=[f"{b:.3g}" for b in vals], label_type="center", color="white", fontsize=8)
            if start is not None and name in start and start.group(name).shape == shape:
                s0 = np.atleast_1d(np.asarray(start.value(name), dtype=float))
                if s0.shape == vals.shape:
                    ax.plot(x, s0, ls="none", marker="_", markersize=30, mew=2, color="C3", label="start")
            ax.set_xticks(x), ax.set_xticklabels(labels), ax.set_ylabel(what)
            set_log_scale(ax, vals)
            ax.legend(fontsize=8)
        ax.set_title(f"learned {what}, {SHAPE_WORDS[shape]}{_describe_start(start, name)}", fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return records.save_figure(fig, path)
