"""Meta-optimisation on the Theano backend: the outer loop over hyperparameters
(docs/ALGORITHMS.md s.3), with DrMAD hypergradients from ``gpu_ver.drmad``.

Repeat: train (forward), DrMAD hypergradient of the validation loss, update the
free coordinates of the tuned groups (log L2 strengths, log learning rates,
logit momenta, log initial scales) with a meta-optimiser, record curves.

Meta-optimisers are (init, update) pairs of pure numpy functions (the same
rules as ``cpu_ver.meta``; gpu_ver does not import cpu_ver):

* SGD with momentum:  m = mu m + g;  x -= eta m
* Adam (Kingma & Ba 2015), textbook (momentum kept after step 0):
  m = b1 m + (1-b1) g;  s = b2 s + (1-b2) g^2;  x -= eta mhat / (sqrt(shat) + eps)
* sign-SGD (the DrMAD experiments): x -= eta sign(g)

``clip`` (``shared.meta_opt.Clip``, as ``cpu_ver.meta.run``'s) rescales the
hypergradient to at most a Euclidean norm, then clips every entry to [-c, c].

Compile once: the ``DrMAD`` engine (all Theano functions) is built before the
loop; a meta-iteration only copies the new hyperparameters to the device. The
loop writes ``checkpoint.npz`` after every meta-iteration; ``resume`` continues
bit for bit. A checkpoint records the model, the data and the settings that
decide the trajectory, and one written for anything else is refused
(ConfigError naming the differing entry).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from shared.cli import option_identity
from shared.errors import ConfigError, NonFiniteError
from shared import interrupt
from shared.meta_opt import HISTORY_KEYS, apply_clip, as_clip, checkpoint_arrays, make_optimizer, new_history
from shared.records import load_checkpoint, require_arrays, save_checkpoint

KIND = "gpu_ver.meta/1"


def identity(engine, config: dict) -> dict:
    """What a checkpoint must match to be resumed: model, layout, problem and settings
    (one key per option, so that a refusal names the option that differs)."""
    p = engine.problem
    lay = p.layout
    return {"kind": KIND, "model": p.model.describe(),
            "layout_sha256": hashlib.sha256(json.dumps(lay.to_json()).encode()).hexdigest()[:16],
            "problem": p.describe(), **option_identity(config)}


def run(engine, hypers, *, n_meta: int, optimizer: str = "adam", meta_lr: float = 0.05, clip=None,
        checkpoint=None, resume: bool = False, config: dict = None, progress: bool = True, on_iter=None):
    """The meta-loop. Returns ``(final hypers, history)``; history has one entry per
    meta-iteration in ``shared.meta_opt.HISTORY_KEYS`` (losses at the weights trained with
    that iteration's hyperparameters; ``meta_objective`` is the validation loss the
    hypergradient differentiates, as in ``cpu_ver.meta.run``) and ``seconds`` (its
    duration, so that a resumed run's total counts the meta-iterations before the resume).
    ``engine``: a compiled ``gpu_ver.drmad.DrMAD`` or ``gpu_ver.reversible.Reversible``
    (compiled once, outside the loop); ``clip``: a ``shared.meta_opt.Clip``, a number
    (the norm) or None."""
    if n_meta < 0:
        raise ConfigError(f"number of meta-iterations must be >= 0, got {n_meta}")
    if engine.velocity == "ignore":
        bad = [g for g in ("lr", "momentum") if g in hypers.tuned]
        if bad:
            raise ConfigError(f"DrMAD with velocity 'ignore' gives no hypergradient for {bad}; "
                              "tune l2/init_scale only or use velocity 'reconstruct'")
    opt = make_optimizer(optimizer, meta_lr)
    clip = as_clip(clip)
    x = hypers.flatten()
    state = opt.init(x)
    history = new_history()
    start = 0
    ident = identity(engine, config or {})
    if resume:
        if checkpoint is None or not Path(checkpoint).exists():
            raise ConfigError(f"resume: no checkpoint at {checkpoint}")
        arrays, meta = load_checkpoint(checkpoint, expect=ident)
        require_arrays(checkpoint, arrays, ["hypers", *("hist_" + k for k in history)])
        x = arrays["hypers"]
        if x.shape != (hypers.size,):
            raise ConfigError(f"{checkpoint}: {x.shape[0]} tuned hyperparameters, this run has {hypers.size}")
        state = {k[len("opt_"):]: arrays[k] for k in arrays if k.startswith("opt_")}
        history = {k: [float(v) for v in arrays["hist_" + k]] for k in history}
        start = int(meta["meta_iter"])
        hypers = hypers.unflatten(x)
    from tqdm.auto import tqdm  # noqa: PLC0415

    p = engine.problem
    engine.f_eval            # compile the evaluation function now, never inside the loop

    def save(done):
        """The checkpoint after ``done`` meta-iterations (also the interrupted one's)."""
        if checkpoint is not None:
            save_checkpoint(checkpoint, checkpoint_arrays(x, state, history), {**ident, "meta_iter": done})

    kind = "exact" if getattr(engine, "K", None) is None else "drmad"
    bar = tqdm(range(start, n_meta), initial=start, total=n_meta, desc=f"meta ({kind})", disable=not progress)
    done = start
    with interrupt.checkpointed(lambda: save(done)):
        for i in bar:
            interrupt.check()                     # Ctrl-C takes effect here, between meta-iterations
            t_iter = time.perf_counter()
            res = engine.hypergradient(hypers)
            g = hypers.flatten_free_grads({k: v for k, v in res.grads.items() if k in hypers.tuned})
            if not np.all(np.isfinite(g)) or not np.isfinite(res.objective):
                raise NonFiniteError("hypergradient", f"{i} (meta-iteration)",
                                     f"validation loss {res.objective}; lower the learning rates or the meta step")
            val_err = res.info["val_error"] if "val_error" in res.info else engine.validation(False)[1]
            train_loss, _ = engine.evaluate(p.X_train, p.y_train)
            test_err = engine.evaluate(p.X_test, p.y_test)[1] if p.y_test is not None and len(p.y_test) else float("nan")
            gnorm = float(np.linalg.norm(g))
            figures = {"train_loss": train_loss, "val_loss": res.objective, "val_error": val_err,
                       "test_error": test_err, "hypergradient_norm": gnorm, "meta_objective": res.objective}
            for k in HISTORY_KEYS:
                history[k].append(float(figures[k]))
            x, state = opt.update(x, apply_clip(g, clip), state)
            hypers = hypers.unflatten(x)
            history["seconds"].append(time.perf_counter() - t_iter)     # kept across a resume, unlike a clock
            bar.set_postfix(val=f"{res.objective:.4f}", gnorm=f"{gnorm:.3g}")
            done = i + 1
            save(done)
            if on_iter is not None:
                on_iter(i, hypers, history)
    bar.close()
    return hypers, history


def evaluate_hypers(engine, hypers) -> dict:
    """Train loss, validation loss and error, test error at the weights a training run with
    ``hypers`` reaches: the figures of the hyperparameters a run saves (its last update
    comes after the last hypergradient, so the history does not hold them)."""
    p = engine.problem
    engine.forward(hypers)
    val_loss, val_error = engine.validation(accumulate_grad=False)
    out = {"train_loss": engine.evaluate(p.X_train, p.y_train)[0], "val_loss": val_loss, "val_error": val_error}
    if p.y_test is not None and len(p.y_test):
        out["test_error"] = engine.evaluate(p.X_test, p.y_test)[1]
    return out
