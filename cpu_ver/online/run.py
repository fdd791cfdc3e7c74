"""One online training step with the autograd MLP, method state (de)serialisation and the
checkpointed training loop.

``step`` forms what an update needs about step t (``rules.GradInfo``): the training
gradient g_t = grad_w L(w_t, l2_t; B_t) with the L2 term the method's state gives, a
Hessian-vector-product closure v -> H_t v on the same batch when the method needs one
(SMD with lambda > 0, IDBD with ``curvature="hvp"``) and a validation-gradient closure
w -> grad_w C2(w) for T1-T2; the gradient is ``model.grad`` for every method, the plain
optimiser included, so overheads compare like with like. ``train_online`` repeats it
over minibatches with curves, hyperparameter quantiles and bit-exact checkpoints.
"""
from __future__ import annotations

import time

import numpy as np

from cpu_ver.online.rules import (AlmeidaState, CombinedState, GradInfo, HDState, IDBDState, Method,
                                  PlainState, SMDState, T1T2State, check_finite_sum)
from shared.errors import ConfigError, check_loss
from shared.online import (QUANTILES, block_quantiles, check_validation_split, curve_arrays, record_due,
                           restore_curves, spent_before)


def grad_and_hvp(model, w, l2, X, y):
    """g = grad_w L(w, l2; X, y) and a closure v -> H v sharing one forward/backward pass."""
    g, hvp_and_mixed = model.grad_and_hvp_fn(w, l2, X, y)
    return g, (lambda v: hvp_and_mixed(v)[0])


def step(method: Method, model, w, state, batch, val_batch=None):
    """One update of ``method`` on minibatch ``batch = (X, y)``; ``val_batch`` for T1-T2.

    Raises NonFiniteError naming the step when the new weights are not finite.
    """
    X, y = batch
    l2 = method.l2(state)
    if method.needs_hvp:
        g, hvp = grad_and_hvp(model, w, l2, X, y)
    else:
        g, hvp = model.grad(w, l2, X, y), None
    val_grad = None
    if val_batch is not None:
        Xv, yv = val_batch
        val_grad = lambda wv: model.nll_grad(wv, Xv, yv)  # noqa: E731
    return method.update(GradInfo(g, hvp, val_grad), state, w)


def state_step(state) -> int:
    """The step counter t of any method's state."""
    return state.lr.t if isinstance(state, CombinedState) else state.t


def state_arrays(state, prefix="state") -> tuple:
    """(arrays, structure): a method state (NamedTuples of arrays, numbers and None, nested)
    as flat numeric arrays named ``<prefix>.<field>...`` plus a JSON structure for
    ``state_from_arrays``; numbers are stored as 0-d arrays, so every value round-trips exactly."""
    arrays = {}

    def walk(x, key):
        if x is None:
            return None
        if isinstance(x, tuple):
            return {"type": type(x).__name__, "items": [walk(v, f"{key}.{i}") for i, v in enumerate(x)]}
        arrays[key] = np.asarray(x)
        return {"key": key, "scalar": type(x).__name__ if np.ndim(x) == 0 and not isinstance(x, np.ndarray)
                else None}

    return arrays, walk(state, prefix)


_STATE_TYPES = {c.__name__: c for c in (tuple, PlainState, HDState, AlmeidaState, IDBDState, SMDState, T1T2State,
                                        CombinedState)}
_SCALARS = {"int": int, "float": float, "bool": bool}


def state_from_arrays(arrays, structure):
    """Inverse of ``state_arrays``."""

    def build(node):
        if node is None:
            return None
        if "items" in node:
            cls = _STATE_TYPES.get(node["type"])
            if cls is None:
                raise ConfigError(f"checkpoint state has an unknown part {node['type']!r}")
            items = [build(v) for v in node["items"]]
            return cls(items) if cls is tuple else cls(*items)
        a = np.asarray(arrays[node["key"]])
        if a.ndim == 0:
            a = a[()]
        return _SCALARS[node["scalar"]](a) if node["scalar"] in _SCALARS else a

    return build(structure)


def train_online(method: Method, model, data, steps, batch_size, seed=0, eval_every=10,
                 eval_train_n=None, record_hypers=True, progress=False, desc=None,
                 checkpoint=None, checkpoint_every=0, identity=None, resume=None, stop_after=None):
    """Train ``model`` with ``method`` for ``steps`` minibatch steps; return curves.

    ``data = (X, y, Xv, yv)``. Minibatch t is ``shared.datasets.batch_indices(n, batch_size,
    seed, t)``; the validation batch of step t (T1-T2) the same with seed + 1 on the
    validation split. Every ``eval_every`` steps (and at 0 and ``steps``): full
    training cross-entropy (the first ``eval_train_n`` training examples when given),
    validation cross-entropy and error, and per-block quantiles of the learning rates
    and L2 strengths. Raises NonFiniteError naming the step when the weights or a
    loss become non-finite, ConfigError for an empty validation split when the method
    needs one.

    Checkpoints as ``gpu_ver.online.run.train_online``: with a ``checkpoint`` path, the
    weights, the method state (``state_arrays``), the curves so far and ``identity`` are
    written atomically every ``checkpoint_every`` steps (0: never in between), when the
    loop ends and when SIGINT/SIGTERM stops it (``shared.interrupt``: only between two
    steps, so the checkpoint's step count and weights agree); ``resume = (arrays, meta)`` continues from the
    step it holds to the same result as an uninterrupted run; ``stop_after`` stops once
    that many steps are done. The curves carry ``steps_done``.
    """
    from shared.datasets import batch_indices
    from shared.interrupt import check as check_interrupt
    from shared.interrupt import checkpointed
    from shared.records import save_checkpoint

    X, y, Xv, yv = data
    check_validation_split(method.name, method.needs_val, len(yv))
    if batch_size < 1 or batch_size > len(y):
        raise ConfigError(f"batch size must be in 1..{len(y)} (training examples), got {batch_size}")
    if checkpoint_every < 0:
        raise ConfigError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    layout = model.layout
    t_start, before = time.perf_counter(), spent_before(resume)
    w = model.init(seed)
    state = method.init(w)
    Xe, ye = (X, y) if eval_train_n is None else (X[:eval_train_n], y[:eval_train_n])
    vb = min(batch_size, len(yv)) if len(yv) else 0
    curves = {"step": [], "train_loss": [], "val_loss": [], "val_error": []}
    hyp = {"lr_quantiles": [], "l2_quantiles": []}
    start = 0
    if resume is not None:
        start = restore_curves(resume, steps, curves, hyp, record_hypers)
        arrays, meta = resume
        w = arrays["w"].copy()
        state = state_from_arrays(arrays, meta["state"])

    def save(step, w, state):
        if checkpoint is None:
            return
        arrays, structure = state_arrays(state)
        arrays.update(curve_arrays(curves, hyp, record_hypers), w=w)
        save_checkpoint(checkpoint, arrays, {**(identity or {}), "step": step, "state": structure,
                                             "spent_s": before + time.perf_counter() - t_start})

    def record(t, w, state):
        """Evaluate first, then append everything (an interruption leaves no half record)."""
        tl = model.nll(w, Xe, ye)
        check_loss("training loss", tl, t)
        row = {"step": t, "train_loss": tl, "val_loss": model.nll(w, Xv, yv) if len(yv) else float("nan"),
               "val_error": model.error(w, Xv, yv) if len(yv) else float("nan")}
        if record_hypers:
            row.update(lr_quantiles=block_quantiles(layout, method.lr_of(state)),
                       l2_quantiles=block_quantiles(layout, method.l2_of(state)))
        for k, v in row.items():
            (curves if k in curves else hyp)[k].append(v)

    def due(t):
        return record_due(t, eval_every, steps)

    if due(start) and (not curves["step"] or curves["step"][-1] != start):
        record(start, w, state)          # also a record an interruption fell before
    end = steps if stop_after is None else max(start, min(steps, int(stop_after)))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, initial=start, desc=desc or method.name, leave=False)
    done = start
    try:
        with checkpointed(lambda: save(done, w, state)):
            for t in range(start, end):
                check_interrupt()                 # Ctrl-C takes effect here, between two steps
                i = batch_indices(len(y), batch_size, seed, t)
                vbatch = None
                if method.needs_val:
                    j = batch_indices(len(yv), vb, seed + 1, t)
                    vbatch = (Xv[j], yv[j])
                w, state = step(method, model, w, state, (X[i], y[i]), vbatch)
                done = t + 1
                if due(done):
                    check_finite_sum("weights", w, t)
                    record(done, w, state)
                if bar is not None:
                    bar.update(1)
                if checkpoint_every and done % checkpoint_every == 0 and done < end:
                    save(done, w, state)
    finally:
        if bar is not None:
            bar.close()
    save(done, w, state)
    out = dict(curves, steps_done=done, spent_s=before + time.perf_counter() - t_start)
    if record_hypers:
        out.update(hyp, blocks=list(layout.names), quantiles=list(QUANTILES))
    return out, w, state
