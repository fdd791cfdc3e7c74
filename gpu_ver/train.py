"""Plain SGD training of DenseNet (or an MLP) on CIFAR-10-format data, with checkpoints.

Recipe (Huang et al. 2016, DenseNet, CIFAR): SGD with Nesterov momentum 0.9,
batch 64, learning rate 0.1 divided by 10 at 50% and 75% of the epochs,
weight decay 1e-4 in torch's sense (gradient + wd * w, i.e. L2 strength
``l2 = wd / 2`` in ``L = CE + sum l2 w^2``), flips and translations by up to
4 pixels (``shared.datasets.augment_cifar``).

Determinism and resuming. Step ``t`` (0-based) uses minibatch
``batch_indices(n_train, batch, seed, t)``, augmentation
``augment_cifar(X, seed, t)`` and the learning rate of epoch
``t // steps_per_epoch``: everything is a pure function of ``(seed, t)`` and
the state ``(w, v, BN running averages)``. A checkpoint stores that state, the
step and the partial epoch sums, so that ``--resume`` continues to the same
weights, bit for bit, as an uninterrupted run. A checkpoint records the model,
data and optimiser settings; resuming with different ones is refused
(ConfigError naming the setting).

Outputs in the run folder: ``results.json`` (learning curves per epoch,
final figures, timings), ``learning_curves.png``, ``checkpoint.npz``
(replaced atomically every ``checkpoint_every`` steps, at the end, and when
the run stops early). A folder that already holds a ``results.json`` or a
``checkpoint.npz`` is refused: nothing is overwritten.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from gpu_ver import config
from shared import datasets, interrupt, records
from shared.errors import ConfigError, check_loss
from shared.datasets import synthetic_images  # noqa: F401 (gpu_ver.train.synthetic_images, as before)
from shared.mlp_spec import parse_layers

CHECKPOINT = "checkpoint.npz"
KIND = "gpu_ver.train/1"


@dataclass(frozen=True)
class TrainConfig:
    """All options of a training run (recorded in results.json and checkpoints)."""

    model: str = "densenet"          # densenet | mlp
    depth: int = 40
    growth: int = 12
    bottleneck: bool = False
    compression: float = 1.0
    activation: str = "relu"
    hidden: str = "100"              # MLP hidden sizes, comma-separated ("" = logistic regression)
    dataset: str = "cifar10"         # cifar10 | synthetic-images (CIFAR-format images)
    data_dir: str | None = None
    n_train: int | None = None
    n_val: int | None = None
    n_test: int | None = None
    image_size: int = 32             # synthetic images only
    epochs: int = 300
    batch: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    augment: bool = True
    eval_batch: int = 500
    checkpoint_every: int = 0        # steps; 0 = only at the end / when stopped
    seed: int = 0
    hypers_from: str | None = None   # RUN_DIR|FILE: lr (shape scalar) and l2 (fixed over steps) from there
    l2_on: str = "all"               # all | weights: which parameters the weight decay covers (shared.coverage)

    def validate(self) -> "TrainConfig":
        if self.model not in ("densenet", "mlp"):
            raise ConfigError(f"--model must be densenet or mlp, got {self.model!r}")
        if self.dataset not in ("cifar10", "synthetic-images"):
            raise ConfigError(f"--dataset must be cifar10 or synthetic-images, got {self.dataset!r}")
        for name in ("epochs", "batch", "eval_batch"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if not self.lr > 0 or not np.isfinite(self.lr):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        from shared.coverage import check_coverage  # noqa: PLC0415

        check_coverage(self.l2_on)
        return self

    def trajectory_keys(self) -> dict:
        """The settings that determine the weight trajectory (must match to resume)."""
        d = asdict(self)
        for k in ("data_dir", "eval_batch", "checkpoint_every"):
            d.pop(k)
        if d["l2_on"] == "all":         # the default: checkpoints written before the option stay resumable
            d.pop("l2_on")
        return d


# --------------------------------------------------------------------------- schedule
def lr_at(epoch: int, base: float, epochs: int) -> float:
    """Step schedule: base, base/10 from 50% of the epochs, base/100 from 75%."""
    return base * (0.1 ** ((epoch >= 0.5 * epochs) + (epoch >= 0.75 * epochs)))


# --------------------------------------------------------------------------- data
def load_data(cfg: TrainConfig) -> datasets.Dataset:
    if cfg.dataset == "synthetic-images":
        return datasets.synthetic_images(cfg.n_train or 512, 128 if cfg.n_val is None else cfg.n_val,
                                128 if cfg.n_test is None else cfg.n_test, size=cfg.image_size, seed=cfg.seed)
    return datasets.load("cifar10", cfg.data_dir, cfg.n_train, cfg.n_val, cfg.n_test, cfg.seed)


# --------------------------------------------------------------------------- model
def build_model(cfg: TrainConfig, data: datasets.Dataset, M):
    """The model for ``cfg`` and ``data`` (``M`` is ``gpu_ver.models``, imported after config.load)."""
    shape = tuple(data.input_shape)
    if cfg.model == "mlp":
        hidden = () if not str(cfg.hidden).strip() else parse_layers(f"1,{cfg.hidden}")[1:]
        return M.MLP((int(np.prod(shape)), *hidden, data.n_classes), cfg.activation)
    return M.DenseNet(cfg.depth, cfg.growth, cfg.bottleneck, cfg.compression, data.n_classes, shape,
                      cfg.activation)


def _as_input(model, X, fx):
    """Cast to floatX; flatten images for an MLP."""
    X = np.asarray(X, dtype=fx)
    return X.reshape(len(X), -1) if model.n_bn == 0 and X.ndim > 2 else X


def sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# --------------------------------------------------------------------------- evaluation
def evaluate(eval_fn, model, split, batch, fx) -> tuple:
    """(mean CE, error rate) over a split in batches of exactly ``batch`` (the static
    shape of the compiled function); the last batch is zero-padded and the padding's
    outputs dropped (exact: evaluation uses BN running averages, examples are independent)."""
    n = len(split)
    if n == 0:
        return float("nan"), float("nan")
    ce, err = 0.0, 0
    for a in range(0, n, batch):
        Xb, yb = split.X[a:a + batch], split.y[a:a + batch]
        k = len(yb)
        if k < batch:
            Xb = np.concatenate([Xb, np.zeros((batch - k, *Xb.shape[1:]), Xb.dtype)])
            yb = np.concatenate([yb, np.zeros(batch - k, yb.dtype)])
        c, e = eval_fn(_as_input(model, Xb, fx), yb)
        ce, err = ce + float(np.sum(c[:k], dtype=np.float64)), err + int(np.sum(e[:k]))
    return ce / n, err / n


# --------------------------------------------------------------------------- loop
def _check_out(run_dir: Path):
    for name in (records.RESULTS_FILE, CHECKPOINT):
        if (run_dir / name).exists():
            raise ConfigError(f"{run_dir / name} exists; choose a new --out (nothing is overwritten)")


def _resume_path(resume) -> Path:
    p = Path(resume)
    return p / CHECKPOINT if p.is_dir() else p


def train(cfg: TrainConfig, run_dir, argv=(), resume=None, stop_after=None, progress=True) -> dict:
    """Train; write results/plots/checkpoints into ``run_dir``; return the results dict.

    ``resume``: a checkpoint file (or a run folder holding ``checkpoint.npz``); the run
    continues in ``run_dir``, which is that folder (the command's convention) or a new one.
    ``stop_after``: stop once this many steps (counted from step 0) are done, as
    an interruption would, leaving a checkpoint to resume from.
    """
    cfg.validate()
    theano = config.load()
    from gpu_ver import models as M  # noqa: PLC0415 (after config.load)

    fx = str(theano.config.floatX)
    run_dir = Path(run_dir)
    if resume is None or _resume_path(resume).parent.absolute() != run_dir.absolute():
        _check_out(run_dir)                 # a new folder; a resumed run may continue in its own
    timings = {}
    t_start = time.perf_counter()
    data = load_data(cfg)
    if cfg.batch > len(data.train):
        raise ConfigError(f"--batch {cfg.batch} exceeds the {len(data.train)} training examples")
    model = build_model(cfg, data, M)
    if cfg.model == "densenet":
        model.check_data(data.train.X, data.train.y, "training data")
    elif cfg.augment and np.ndim(data.train.X) != 4:
        raise ConfigError("--augment needs image data")
    spe = len(data.train) // cfg.batch
    total = cfg.epochs * spe
    identity = {"kind": KIND, "model": model.describe(), "train": cfg.trajectory_keys(), "floatX": fx,
                "data": {"name": data.name, "n_train": len(data.train)}}

    eval_batch = min(cfg.eval_batch, max(len(data.val), len(data.test), 1))
    model, eval_model = M.with_batch_size(model, cfg.batch), M.with_batch_size(model, eval_batch)
    base_lr, l2 = cfg.lr, cfg.weight_decay / 2
    start = {}
    if cfg.hypers_from:             # before the run folder is made
        from shared.hyperparams import load_fixed  # noqa: PLC0415

        start = load_fixed(cfg.hypers_from, model.layout, scalar=("lr",), per_param=("l2",), l2_on=cfg.l2_on)
        base_lr, l2 = start.get("lr", base_lr), start.get("l2", l2)
    from shared.coverage import apply as cover  # noqa: PLC0415

    l2 = cover(l2, model.layout, cfg.l2_on)      # 0 on the parameters --l2-on leaves out
    state = M.SGDState(model, model.init(cfg.seed), lr=base_lr, l2=l2)
    t0, hist, acc = 0, {k: [] for k in ("epoch", "lr", "train_loss", "train_error", "val_loss", "val_error",
                                         "test_loss", "test_error")}, [0.0, 0]
    before = {"train_s": 0.0, "eval_s": 0.0}       # time spent before a resume (from the checkpoint)
    if resume is not None:
        arrays, meta = records.load_checkpoint(_resume_path(resume), expect=identity)
        state.set_arrays(arrays)
        t0, hist, acc = int(meta["step"]), meta["history"], list(meta["epoch_acc"])
        before = {k: float(meta.get("spent", {}).get(k, 0.0)) for k in before}
    timings["setup_s"] = time.perf_counter() - t_start

    t = time.perf_counter()
    step_fn = M.compile_sgd_step(state, cfg.momentum, cfg.nesterov)
    eval_fn = M.compile_evaluate(state, eval_model)
    timings["compile_s"] = time.perf_counter() - t

    records.make_run_dir(run_dir)
    ckpt = run_dir / CHECKPOINT

    def spent():
        """Training and evaluation seconds of the whole run so far, this process and before."""
        return {"train_s": before["train_s"] + time.perf_counter() - t_train - t_eval,
                "eval_s": before["eval_s"] + t_eval}

    def save(step):
        records.save_checkpoint(ckpt, state.get_arrays(),
                                {**identity, "step": step, "history": hist, "epoch_acc": acc, "spent": spent()})

    bar = None
    if progress:
        from tqdm import tqdm  # noqa: PLC0415
        bar = tqdm(total=total, initial=t0, desc="train", unit="step", dynamic_ncols=True)
    end = total if stop_after is None else min(total, int(stop_after))
    t_train, t_eval, step = time.perf_counter(), 0.0, t0
    try:
        with interrupt.checkpointed(lambda: save(step)):
            for step in range(t0, end):
                interrupt.check()             # Ctrl-C takes effect here: step_fn updates the weights in place
                epoch = step // spe
                lr = lr_at(epoch, base_lr, cfg.epochs)
                state.lr.set_value(np.asarray(lr, fx))
                idx = datasets.batch_indices(len(data.train), cfg.batch, cfg.seed, step)
                Xb = data.train.X[idx]
                if cfg.augment:
                    Xb = datasets.augment_cifar(Xb, cfg.seed, step)
                loss, nll, n_err = step_fn(_as_input(model, Xb, fx), data.train.y[idx])
                check_loss("training loss", loss, step + 1)
                acc[0], acc[1] = acc[0] + float(nll), acc[1] + int(n_err)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss):.4f}", refresh=False)
                if (step + 1) % spe == 0:
                    te = time.perf_counter()
                    vl, ve = evaluate(eval_fn, model, data.val, eval_batch, fx)
                    tl, tev = evaluate(eval_fn, model, data.test, eval_batch, fx)
                    t_eval += time.perf_counter() - te
                    for k, val in zip(hist, (epoch + 1, lr, acc[0] / spe, acc[1] / (spe * cfg.batch), vl, ve, tl, tev)):
                        hist[k].append(val)
                    acc = [0.0, 0]
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                    save(step + 1)
            step = end
    finally:
        if bar is not None:
            bar.close()
    save(step)
    timings["this_process_train_s"] = time.perf_counter() - t_train - t_eval
    timings.update(spent())                        # the whole run, also the part before a resume
    timings["step_s_mean"] = timings["this_process_train_s"] / max(step - t0, 1)
    timings["total_s"] = time.perf_counter() - t_start

    w = state.w.get_value()
    metrics = {"steps_done": step, "steps_total": total, "completed": step == total,
               "n_params": model.layout.size, "weights_sha256": sha256(w), "checkpoint": str(ckpt),
               "curves": hist}
    for k in ("train_loss", "train_error", "val_loss", "val_error", "test_loss", "test_error"):
        metrics[f"final_{k}"] = hist[k][-1] if hist[k] else None
    conf = {**asdict(cfg), "floatX": fx, "device": str(theano.config.device), "data": data.describe(),
            "model_description": model.describe(), "resumed_from": None if resume is None else str(resume),
            "stop_after": stop_after}
    if start:                       # --hypers-from: the values the run used
        conf["hypers_start"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in start.items()}
    records.write_results(run_dir, list(argv), conf, metrics, timings)
    if hist["epoch"]:
        plot_curves(hist, run_dir / "learning_curves.png")
    return {"config": conf, "metrics": metrics, "timings": timings, "state": state}


def plot_curves(hist: dict, path) -> None:
    import sys  # noqa: PLC0415

    import matplotlib  # noqa: PLC0415

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for k in ("train", "val", "test"):
        a.plot(hist["epoch"], hist[f"{k}_loss"], label=k)
        b.plot(hist["epoch"], [100 * e for e in hist[f"{k}_error"]], label=k)
    a.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    b.set(xlabel="epoch", ylabel="error (%)", title="error")
    from shared.plotting import integer_axis  # noqa: PLC0415

    integer_axis(a), integer_axis(b)
    a.legend()
    b.legend()
    fig.tight_layout()
    records.save_figure(fig, path)


def config_from_args(args) -> TrainConfig:
    """TrainConfig from parsed command-line options (same names)."""
    fields = TrainConfig.__dataclass_fields__
    return replace(TrainConfig(), **{k: getattr(args, k) for k in fields if hasattr(args, k)}).validate()
