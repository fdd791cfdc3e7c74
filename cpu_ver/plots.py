"""Plots of meta-optimisation runs: learning curves and learned hyperparameters (PNG)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.plotting import integer_axis
from shared import records


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def learning_curves(history: dict, path: Path, title: str = "", final: dict | None = None) -> None:
    """Train/validation loss, test error and hypergradient norm per meta-iteration; ``final``
    (``meta.evaluate_hypers`` of the saved hyperparameters) adds the point after the last update."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    it = np.arange(len(history["val_loss"]))
    curves = {k: list(history[k]) for k in ("train_loss", "val_loss", "test_error")}
    if final is not None:
        for k in curves:
            curves[k].append(final.get(k, float("nan")))
    at = np.arange(len(curves["val_loss"]))
    axes[0].plot(at, curves["train_loss"], marker=".", label="train loss")
    axes[0].plot(at, curves["val_loss"], marker=".", label="validation loss")
    axes[0].set_xlabel("meta-iteration (last: saved hyperparameters)" if final else "meta-iteration")
    axes[0].legend(), axes[0].set_title("cross-entropy")
    axes[1].plot(at, 100 * np.asarray(curves["test_error"], dtype=float), marker=".", color="C2")
    axes[1].set_xlabel("meta-iteration"), axes[1].set_ylabel("test error (%)"), axes[1].set_title("test error")
    axes[2].semilogy(it, np.maximum(history["hypergradient_norm"], 1e-300), marker=".", color="C3")
    axes[2].set_xlabel("meta-iteration"), axes[2].set_title("hypergradient norm\n(free coordinates: log L2, log lr, logit momentum)", fontsize=9)
    for a in axes:
        integer_axis(a)
    fig.suptitle(title)
    fig.tight_layout()
    records.save_figure(fig, path)


def hyperparameters(hypers, path: Path) -> None:
    """L2 strengths per layer (histogram of log10) and the learning-rate schedule (heat map)."""
    plt = _plt()
    layout = hypers.layout
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    l2 = hypers.per_param("l2", 0 if hypers.group("l2").shape.startswith("iter") else None)
    for b, name in enumerate(layout.names):
        if name.startswith("W"):
            axes[0].hist(np.log10(l2[layout.slice(b)]), bins=40, alpha=0.6, label=name)
    axes[0].set_xlabel("log10 L2 strength"), axes[0].set_title("L2 per weight, by layer"), axes[0].legend()
    lr = hypers.value("lr")
    shape = hypers.group("lr").shape
    if shape == "iter_block":
        im = axes[1].imshow(np.log10(lr.T), aspect="auto", interpolation="nearest", cmap="viridis")
        axes[1].set_yticks(range(layout.n_blocks)), axes[1].set_yticklabels(layout.names)
        axes[1].set_xlabel("training step"), fig.colorbar(im, ax=axes[1], label="log10 learning rate")
        integer_axis(axes[1])
    elif shape == "iter":
        axes[1].plot(lr), axes[1].set_xlabel("training step"), axes[1].set_yscale("log")
        integer_axis(axes[1])
    else:
        axes[1].hist(np.log10(np.ravel(lr)), bins=40)
        axes[1].set_xlabel("log10 learning rate")
    axes[1].set_title(f"learning rates ({shape})")
    fig.tight_layout()
    records.save_figure(fig, path)
