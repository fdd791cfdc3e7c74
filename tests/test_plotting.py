"""Figures (``shared/plotting.py``, ``cpu_ver/plots.py``): what a reader would stumble on.

Each figure is caught at ``save_figure`` and its properties asserted: no non-finite
value reaches a colour map, integer axes tick at integers, a hyperparameter the method
never changes gets no panel, distinct tick labels, titles that name method and data."""
from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.ticker import MaxNLocator

import cpu_ver.__main__ as cpu_main
from shared import plotting, records

CPU_TINY = ["--layers", "64,12,10", "--iters", "8", "--batch", "50", "--n-train", "200", "--n-val", "100",
            "--no-progress"]


@pytest.fixture
def figures(monkeypatch):
    """{file name: figure} of every figure saved (drawn, not closed)."""
    saved = {}

    def keep(fig, path):
        fig.canvas.draw()
        saved[str(path).rsplit("/", 1)[-1]] = fig
        return path
    monkeypatch.setattr(records, "save_figure", keep)
    return saved


def _integer_x(ax):
    loc = ax.xaxis.get_major_locator()
    return isinstance(loc, MaxNLocator) and loc._integer and all(float(t).is_integer() for t in ax.get_xticks())


def _hd_log(n_steps=5, blocks=("W0", "b0", "W1", "b1")):
    """An HD method's log: the learning rates move within 1e-7 of 0.01; the L2 is 0 throughout."""
    steps = list(range(0, 2 * n_steps, 2))
    lr = 0.01 + 1e-7 * np.arange(n_steps)[:, None, None] * np.ones((1, len(blocks), 5))
    curve = list(np.linspace(2.3, 2.1, n_steps))
    return {"step": steps, "blocks": list(blocks), "lr_quantiles": lr.tolist(),
            "l2_quantiles": np.zeros_like(lr).tolist(), "train_loss": curve, "val_loss": curve,
            "val_error": [0.9] * n_steps}


def test_log10_image_masks_what_has_no_logarithm():
    img = plotting.log10_image([[0.0, 1e-3], [np.inf, 10.0]])
    assert np.ma.count_masked(img) == 2
    assert np.all(np.isfinite(img.compressed())) and list(img.compressed()) == [-3.0, 1.0]


def test_adaptive_figures_of_an_hd_run(figures, tmp_path):
    res = _hd_log()
    written = plotting.adaptive_figures(tmp_path, res, res, "hd", "sgd", "digits, 200 training examples, 8 steps")
    assert written == ["curves.png", "hyperparameters.png", "hyper_heatmap.png"]
    for name, fig in figures.items():
        title = fig._suptitle.get_text()
        assert "hd vs sgd on digits, 200 training examples" in title, (name, title)
        for ax in fig.axes:
            if ax.get_xlabel() == "step":
                assert _integer_x(ax), name
    hp = figures["hyperparameters.png"]
    assert len(hp.axes) == 1 and "learning rate" in hp.axes[0].get_ylabel()     # no empty L2 panel
    assert "L2 strength fixed at 0: not adapted by hd" in hp._suptitle.get_text()
    labels = [t.get_text() for t in hp.axes[0].get_yticklabels() if t.get_text()]
    assert len(labels) == len(set(labels)) > 1, labels                          # no repeated tick labels
    for ax in figures["hyper_heatmap.png"].axes:
        for im in ax.get_images():
            a = im.get_array()
            assert np.all(np.isfinite(np.ma.compressed(a))), ax.get_title()
            lo, hi = im.get_clim()
            assert -3 < lo <= hi < 0                                           # log10 of ~0.01, not of 0
    assert "%" in figures["curves.png"].axes[2].get_ylabel()


def test_a_zero_in_an_adapted_l2_is_blank_not_minus_300(figures, tmp_path):
    res = _hd_log()
    l2 = np.full_like(np.asarray(res["lr_quantiles"]), 1e-4)
    l2[-1, 0] = 0.0
    res["l2_quantiles"] = l2.tolist()
    plotting.adaptive_figures(tmp_path, res, None, "t1t2", "sgd", "digits")
    heat = figures["hyper_heatmap.png"]
    assert len(heat.axes) == 4                          # two heat maps, two colour bars
    im = heat.axes[1].get_images()[0]
    lo, hi = im.get_clim()
    assert -5 < lo <= hi < -3 and "blank: 0" in heat.axes[1].get_title()    # not log10(1e-300) = -300


def test_meta_curves_have_integer_axes_and_a_unit(figures, tmp_path):
    out = tmp_path / "m"
    assert cpu_main.main(["meta", "--out", str(out), "--meta-iters", "2", *CPU_TINY]) == 0
    fig = figures["learning_curves.png"]
    assert all(_integer_x(ax) for ax in fig.axes)
    assert fig.axes[1].get_ylabel() == "test error (%)"
    err = json.loads((out / "results.json").read_text())["metrics"]["test_error"]
    assert fig.axes[1].lines[0].get_ydata()[0] == pytest.approx(100 * err[0])
    heat = figures["hyperparameters.png"].axes[1]
    assert _integer_x(heat)


def test_meta_without_meta_iterations_writes_no_blank_curves(figures, tmp_path):
    assert cpu_main.main(["meta", "--out", str(tmp_path / "m0"), "--meta-iters", "0", *CPU_TINY]) == 0
    assert "learning_curves.png" not in figures and "hyperparameters.png" in figures


def test_one_value_for_every_layer_is_one_line_without_a_band(figures, tmp_path):
    """Global granularity (one learning rate for all layers) draws one labelled line and no
    10-90% band (per layer, four identical lines and an invisible band hid that); distinct
    per-layer values keep a line and a band per layer."""
    res = _hd_log()
    plotting.adaptive_figures(tmp_path, res, res, "hd", "sgd", "digits")
    a = figures["hyperparameters.png"].axes[0]
    assert len(a.get_lines()) == 1 and not a.collections
    assert a.get_legend().get_texts()[0].get_text() == "all layers (one value)"
    figures.clear()
    per_layer = dict(res, lr_quantiles=(np.asarray(res["lr_quantiles"]) * np.arange(1, 5)[None, :, None]).tolist())
    plotting.adaptive_figures(tmp_path, per_layer, res, "hd", "sgd", "digits")
    a = figures["hyperparameters.png"].axes[0]
    assert len(a.get_lines()) == 4 and len(a.collections) == 4
