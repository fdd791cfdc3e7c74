"""Meta-optimisation: the outer loop over hyperparameters (docs/ALGORITHMS.md s.3).

Repeat: train (forward), compute the hypergradient of the meta-objective
(exact reversal or DrMAD), update the free hyperparameter coordinates with a
meta-optimiser, record train/validation/test curves.

Meta-optimisers are (init, update) pairs of pure functions, as in optax::

    state = init(x0);  x_new, state = update(x, grad, state)

* SGD with momentum:  m = mu m + g;  x -= eta m
* Adam (Kingma & Ba 2015), textbook (the reversible-learning code's "adam"
  disabled momentum after step 0; this one does not):
  m = b1 m + (1-b1) g;  s = b2 s + (1-b2) g^2;  x -= eta mhat / (sqrt(shat) + eps)
* sign-SGD (as in the DrMAD experiments): x -= eta sign(g)

Optional clipping (``shared.meta_opt.Clip``) rescales g to a maximum Euclidean
norm and then clips its entries. Non-finite
hypergradients stop the loop with ``NonFiniteError`` naming the meta-iteration.
The loop checkpoints after every meta-iteration and resumes to identical
results: everything it depends on (hyperparameters, optimiser state, history)
is in the checkpoint, and every training run is seeded.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cpu_ver import drmad, reversible, sgd
from cpu_ver.problem import Problem
from shared.cli import option_identity
from shared.errors import ConfigError, NonFiniteError
from shared.interrupt import check as check_interrupt
from shared.interrupt import checkpointed
from shared.meta_opt import HISTORY_KEYS, apply_clip, as_clip, checkpoint_arrays, make_optimizer, new_history
from shared.records import load_checkpoint, require_arrays, save_checkpoint


def compute_hypergradient(problem: Problem, hypers, method: str, drmad_opts: dict):
    if method == "exact":
        return reversible.hypergradient(problem, hypers)
    if method == "drmad":
        return drmad.hypergradient(problem, hypers, **drmad_opts)
    raise ConfigError(f"hypergradient method must be 'exact' or 'drmad', got {method!r}")


def evaluate(problem: Problem, w) -> dict:
    """Train loss (cross-entropy on the whole training split), validation loss and error, test error."""
    m = problem.model
    out = {"train_loss": m.nll(w, problem.X_train, problem.y_train),
           "val_loss": m.nll(w, problem.X_val, problem.y_val), "val_error": m.error(w, problem.X_val, problem.y_val)}
    if problem.X_test is not None and len(problem.y_test):
        out["test_error"] = m.error(w, problem.X_test, problem.y_test)
    return out


def evaluate_hypers(problem: Problem, hypers) -> dict:
    """``evaluate`` at the weights a plain training run with ``hypers`` reaches: the
    figures of the hyperparameters a run saves (its last update is made after the last
    hypergradient, so the history does not hold them)."""
    w, _, _ = sgd.train(problem, hypers)
    return evaluate(problem, w)


def run(problem: Problem, hypers, *, n_meta: int, method: str = "exact", drmad_opts=None,
        optimizer: str = "adam", meta_lr: float = 0.04, clip=None, checkpoint: Path = None,
        resume: bool = False, config: dict = None, progress: bool = True, on_iter=None):
    """The meta-optimisation loop. Returns ``(final hypers, history dict)``.

    ``history`` has one entry per meta-iteration in ``shared.meta_opt.HISTORY_KEYS``
    (``train_loss``, ``val_loss``, ``val_error``, ``test_error``, ``hypergradient_norm``,
    ``meta_objective``; as ``gpu_ver.meta.run``) and ``seconds`` (its duration, so that a
    resumed run's total counts the meta-iterations before the resume). ``clip``: a
    ``shared.meta_opt.Clip``, a number (the norm) or None.
    """
    drmad_opts = dict(drmad_opts or {})
    if method == "drmad" and drmad_opts.get("velocity") == "ignore":
        bad = [g for g in ("lr", "momentum") if g in hypers.tuned]
        if bad:
            raise ConfigError(f"DrMAD with velocity='ignore' gives no hypergradient for {bad}; "
                              "tune l2/init_scale only or use velocity='reconstruct'")
    if n_meta < 0:
        raise ConfigError(f"number of meta-iterations must be >= 0, got {n_meta}")
    opt = make_optimizer(optimizer, meta_lr)
    clip = as_clip(clip)
    x = hypers.flatten()
    state = opt.init(x)
    history = new_history()
    keys = tuple(history)
    start = 0
    ident = option_identity(config or {})      # one key per option: a refused resume names it
    if resume:
        if checkpoint is None or not Path(checkpoint).exists():
            raise ConfigError(f"--resume: no checkpoint at {checkpoint}")
        arrays, meta = load_checkpoint(checkpoint, expect=ident)
        require_arrays(checkpoint, arrays, ["hypers", *("hist_" + k for k in keys)])
        x = arrays["hypers"]
        state = {k[len("opt_"):]: arrays[k] for k in arrays if k.startswith("opt_")}
        history = {k: list(arrays["hist_" + k]) for k in keys}
        start = int(meta["meta_iter"])
        hypers = hypers.unflatten(x)

    def save(done):
        """The checkpoint after ``done`` meta-iterations (also the interrupted one's)."""
        if checkpoint is not None:
            save_checkpoint(checkpoint, checkpoint_arrays(x, state, history), {**ident, "meta_iter": done})

    bar = tqdm(range(start, n_meta), initial=start, total=n_meta, desc=f"meta ({method})", disable=not progress)
    done = start
    with checkpointed(lambda: save(done)):
        for i in bar:
            check_interrupt()                     # Ctrl-C takes effect here, between meta-iterations
            t_iter = time.perf_counter()
            res = compute_hypergradient(problem, hypers, method, drmad_opts)
            g = hypers.flatten_free_grads(res.grads)
            if not np.all(np.isfinite(g)) or not np.isfinite(res.objective):
                raise NonFiniteError("hypergradient", f"{i} (meta-iteration)",
                                     f"meta-objective {res.objective}; the training run may have diverged, "
                                     "lower the learning rates or the meta step")
            ev = evaluate(problem, res.w_final)
            gnorm = float(np.linalg.norm(g))
            figures = {**ev, "test_error": ev.get("test_error", float("nan")), "hypergradient_norm": gnorm,
                       "meta_objective": res.objective}
            for k in HISTORY_KEYS:
                history[k].append(float(figures[k]))
            x, state = opt.update(x, apply_clip(g, clip), state)
            hypers = hypers.unflatten(x)
            history["seconds"].append(time.perf_counter() - t_iter)     # kept across a resume, unlike a clock
            bar.set_postfix(val=f"{ev['val_loss']:.4f}", gnorm=f"{gnorm:.3g}")
            done = i + 1
            save(done)
            if on_iter is not None:
                on_iter(i, hypers, history)
    return hypers, history
