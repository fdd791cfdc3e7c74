"""A compiled online run on the Theano backend (``OnlineRun``) and the checkpointed
training loop (``train_online``).

``OnlineRun(model, method, w0)`` keeps ALL state in Theano shared variables: the
weights ``w``, the method's state (learning rates or log step sizes, traces,
directions, optimiser moments, L2 strengths, counters) and the batch-norm running
averages, and compiles ONE function per run, ``step(X, y[, Xv, yv])``, which does
the whole update of step t (training gradient g_t = grad_w L(w_t, l2_t; B_t),
Hessian-vector product H_t v when the method needs one, validation gradient for
T1-T2, hyperparameter and weight updates) in one call; the host sends the batch
and receives a few scalars (loss, CE, errors, sums used for the finiteness check).
Hessian-vector products are reverse over reverse (``tt.grad`` of ``grad . v``;
``tt.Rop`` fails for conv). A T1-T2 hyper step every N > 1 steps sits behind a lazy
``ifelse``, so the steps in between do not evaluate the validation gradient.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict

import numpy as np

from gpu_ver import config
from gpu_ver.online.rules import Ctx, Method, floatx
from shared.errors import ConfigError, NonFiniteError, check_finite, check_loss
from shared.online import (QUANTILES, block_quantiles, check_validation_split, curve_arrays, record_due,
                           restore_curves, spent_before)

theano = config.load()
tt = theano.tensor

from gpu_ver import fncache  # noqa: E402
from gpu_ver import models as M  # noqa: E402

BN_MOMENTUM = M.BN_MOMENTUM


def _like(v, var):
    """``v`` cast to the dtype and broadcast pattern of shared variable ``var`` (an update's type)."""
    v = tt.cast(v, var.dtype)
    axes = [i for i, (a, b) in enumerate(zip(v.broadcastable, var.broadcastable)) if a and not b]
    # the Op itself: tt.unbroadcast's lift optimisation crashes on a fresh Elemwise in Theano-PyMC 1.1.2
    return tt.Rebroadcast(*[(i, False) for i in axes])(v) if axes else v


_FUNCTIONS = {}


def model_functions(model) -> "M.Functions":
    """One ``models.Functions`` per model (its compiled evaluation is shared by all runs)."""
    if model not in _FUNCTIONS:
        _FUNCTIONS[model] = M.Functions(model)
    return _FUNCTIONS[model]


def _bn_hw(model):
    return [u[3] for u in model.plan() if u[0] == "bn"] if getattr(model, "n_bn", 0) else []


class OnlineRun:
    """Weights, method state and BN running averages in shared variables; ``step`` compiled once.

    ``step(X, y, Xv=None, yv=None) -> dict(loss, nll, n_err)``: one update
    (loss and CE at the pre-update weights, L2 term included in ``loss``);
    raises NonFiniteError naming the quantity and the step. ``evaluate(X, y)``
    -> (mean CE, error rate) at the current weights with the BN running
    averages (one compiled ``models.Functions.logits`` per model, shared by runs).
    """

    def __init__(self, model, method: Method, w0, bn_momentum=BN_MOMENTUM, name=None, mode=None):
        fx = floatx()
        self.model, self.method, self.fx, self.mode = model, method, fx, mode
        self.w = theano.shared(np.asarray(w0, fx), name="w")
        self._init = method.init(np.asarray(w0, float))
        self.S = OrderedDict()
        for k, v in self._init.items():
            a = np.asarray(v)
            self.S[k] = theano.shared(a if a.dtype.kind == "i" else a.astype(fx), name=k)
        self.bn = [(theano.shared(np.zeros(ch, fx), name=f"bn{i}.mean"),
                    theano.shared(np.ones(ch, fx), name=f"bn{i}.var"))
                   for i, ch in enumerate(getattr(model, "bn_channels", ()))]
        self._warned = False
        self._fn, self._mon_names = self._compile(bn_momentum, name or method.name)

    @property
    def function(self):
        """The compiled Theano function of one step (for ``gpu_ver.hostops``)."""
        return self._fn

    # graph -------------------------------------------------------------------------
    def _compile(self, bn_momentum, name):
        m, meth, S, w = self.model, self.method, self.S, self.w
        X, y = m.input_var("X"), tt.lvector("y")
        l2 = meth.l2_expr(S)
        blocks = M.split(w, m.layout)
        logits, stats = m.forward(blocks, X, None)
        nll = M.cross_entropy(logits, y)
        gb = M.grad(nll, blocks)
        g = M.flat(gb) + 2 * l2 * w
        hv = None
        if meth.hvp_of is not None:
            vec = S[meth.hvp_of]
            vb = M.split(vec, m.layout)
            hv = M.flat(M.grad(M.block_dot(gb, vb), blocks)) + 2 * l2 * vec
        ins = [X, y]
        val_grad = None
        if meth.needs_val:
            Xv, yv = m.input_var("Xv"), tt.lvector("yv")
            ins += [Xv, yv]

            def val_grad(wv):
                bv = M.split(wv, m.layout)
                lv, _ = m.forward(bv, Xv, None)
                return M.flat(M.grad(M.cross_entropy(lv, yv), bv))
        w_new, upd, mon = meth.build(Ctx(S, w, g, hv, val_grad))
        loss = nll + tt.sum(l2 * tt.sqr(w))
        n_err = tt.neq(tt.argmax(logits, axis=1), y).sum()
        updates = [(w, w_new)] + [(S[k], _like(v, S[k])) for k, v in upd.items()]
        for (rm, rv), (mu, var), (H, W) in zip(self.bn, stats, _bn_hw(m)):
            n = X.shape[0] * H * W
            unbiased = var * tt.cast(n, var.dtype) / tt.cast(n - 1, var.dtype)
            updates += [(rm, (1 - bn_momentum) * rm + bn_momentum * mu),
                        (rv, (1 - bn_momentum) * rv + bn_momentum * unbiased)]
        mon = OrderedDict(mon)
        mon["weights"] = tt.sum(w_new)
        outs = [loss, nll, n_err] + list(mon.values())
        if "n_projected" in upd:
            outs.append(upd["n_projected"])
        fn = fncache.function(ins, outs, updates=updates, name=f"{name}_step", mode=self.mode)
        return fn, list(mon)

    # host API ----------------------------------------------------------------------
    def _in(self, X):
        X = np.asarray(X, self.fx)
        return X.reshape(len(X), -1) if getattr(self.model, "n_bn", 0) == 0 and X.ndim > 2 else X

    @property
    def t(self) -> int:
        return self.method.step_of({k: v.get_value() for k, v in self.S.items() if k in ("t", "r_t")})

    def step(self, X, y, Xv=None, yv=None) -> dict:
        t = self.t
        args = [self._in(X), np.asarray(y, np.int64)]
        if self.method.needs_val:
            if Xv is None or len(yv) == 0:
                raise ConfigError(f"{self.method.name}: needs a validation batch (the validation split is empty?)")
            args += [self._in(Xv), np.asarray(yv, np.int64)]
        outs = self._fn(*args)
        loss, nll, n_err = float(outs[0]), float(outs[1]), int(outs[2])
        check_finite("training loss", loss, t)
        for what, s in zip(self._mon_names, outs[3:3 + len(self._mon_names)]):
            if not np.isfinite(s):
                if what == "weights":
                    check_finite("weights", self.w.get_value(borrow=True), t)   # the sum may merely overflow
                else:
                    raise NonFiniteError(what, t)
        if len(outs) > 3 + len(self._mon_names) and int(outs[-1]) > 0 and not self._warned:
            self._warned = True
            warnings.warn(f"{self.method.name}: step {t}: learning rate(s) went below "
                          f"lr_min={self.method.config.get('lr_min', 1e-12):g} and were projected onto it "
                          f"(counted in state n_projected)", RuntimeWarning, stacklevel=2)
        return {"loss": loss, "nll": nll, "n_err": n_err}

    def weights(self) -> np.ndarray:
        return np.asarray(self.w.get_value(), np.float64)

    def state(self) -> dict:
        """The method's state as numpy arrays (float64 for floats)."""
        out = {}
        for k, v in self.S.items():
            a = np.asarray(v.get_value())
            out[k] = a if a.dtype.kind == "i" else a.astype(np.float64)
        return out

    def set_state(self, w=None, **arrays) -> None:
        if w is not None:
            self.w.set_value(np.asarray(w, self.fx))
        for k, a in arrays.items():
            var = self.S[k]
            var.set_value(np.asarray(a, var.dtype))

    def _checkpoint_vars(self) -> dict:
        """Everything ``step`` reads and writes: weights ``w``, method state ``S.<name>``,
        BN running averages ``bn<i>.mean``/``bn<i>.var``."""
        return {"w": self.w, **{f"S.{k}": v for k, v in self.S.items()},
                **{v.name: v for pair in self.bn for v in pair}}

    def get_arrays(self) -> dict:
        """The values of ``_checkpoint_vars`` as stored: a checkpoint."""
        return {k: v.get_value() for k, v in self._checkpoint_vars().items()}

    def set_arrays(self, arrays: dict) -> None:
        """Restore ``get_arrays``'s output (every entry must be present with its shape)."""
        for key, var in self._checkpoint_vars().items():
            if key not in arrays:
                raise ConfigError(f"checkpoint has no array {key!r}")
            a, cur = np.asarray(arrays[key]), var.get_value()
            if a.shape != np.shape(cur):
                raise ConfigError(f"checkpoint array {key!r} has shape {a.shape}, expected {np.shape(cur)}")
            var.set_value(a.astype(np.asarray(cur).dtype))

    def reset(self) -> None:
        """Back to the initial state (weights kept as they are)."""
        self.set_state(**self._init)

    def reset_trace(self) -> None:
        """Zero the IDBD/SMD trace (so the next hypergradient is exactly one-step)."""
        if self.method.trace is not None:
            self.set_state(**{self.method.trace: np.zeros(self.model.layout.size)})

    def lr(self):
        return self.method.lr_of(self.state())

    def l2(self):
        return self.method.l2_of(self.state())

    def bn_values(self) -> list:
        return [(a.get_value(), b.get_value()) for a, b in self.bn]

    def evaluate(self, X, y, batch=500) -> tuple:
        """(mean CE, error rate) at the current weights, BN running averages."""
        n = len(y)
        if n == 0:
            return float("nan"), float("nan")
        fns = model_functions(self.model)
        w, bn = self.weights(), (self.bn_values() if self.bn else None)
        ce, err = 0.0, 0
        for a in range(0, n, batch):
            z = fns.logits(w, self._in(X[a:a + batch]), bn)
            yb = np.asarray(y[a:a + batch], np.int64)
            zm = z - z.max(axis=1, keepdims=True)
            logp = zm - np.log(np.exp(zm).sum(axis=1, keepdims=True))
            ce -= float(logp[np.arange(len(yb)), yb].sum())
            err += int(np.count_nonzero(np.argmax(z, axis=1) != yb))
        return ce / n, err / n


def train_online(method: Method, model, data, steps, batch_size, seed=0, eval_every=10, eval_train_n=None,
                 record_hypers=True, progress=False, desc=None, eval_batch=500, w0=None,
                 checkpoint=None, checkpoint_every=0, identity=None, resume=None, stop_after=None):
    """Train ``model`` with ``method`` for ``steps`` minibatch steps; return (curves, run).

    ``data = (X, y, Xv, yv)``; batches as cpu_ver (``batch_indices(n, batch, seed, t)``; the
    validation batch of step t with seed + 1). Every ``eval_every`` steps (and at 0 and
    ``steps``): training CE (first ``eval_train_n`` examples), validation CE and error (BN
    running averages), and per-block quantiles of learning rates and L2 strengths. Also
    records the mean training-batch loss per interval (``batch_loss``) and timings.

    Checkpoints: with a ``checkpoint`` path, the run's arrays (``OnlineRun.get_arrays``),
    the curves so far and ``identity`` (a dict naming the run) are written there
    atomically every ``checkpoint_every`` steps (0: never in between), when the loop ends
    and when SIGINT/SIGTERM stops it (``shared.interrupt``: only between two steps, never
    after a compiled step has updated the shared variables but before it was counted).
    ``resume = (arrays, meta)`` from ``load_checkpoint`` continues from the step it holds;
    the curves and the state then equal an uninterrupted run's bit for bit (minibatches
    are a function of (seed, t)).
    ``stop_after``: stop once this many steps are done, as an interruption would.
    The returned curves carry ``steps_done``.
    """
    import time

    from shared.datasets import batch_indices
    from shared.interrupt import check as check_interrupt
    from shared.interrupt import checkpointed
    from shared.records import save_checkpoint

    X, y, Xv, yv = data
    check_validation_split(method.name, method.needs_val, len(yv))
    if batch_size < 1 or batch_size > len(y):
        raise ConfigError(f"batch size must be in 1..{len(y)} (training examples), got {batch_size}")
    if steps < 1 or eval_every < 1:
        raise ConfigError("steps and eval_every must be >= 1")
    if checkpoint_every < 0:
        raise ConfigError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    layout = model.layout
    t0, before = time.perf_counter(), spent_before(resume)
    run = OnlineRun(model, method, model.init(seed) if w0 is None else w0)
    compile_s = time.perf_counter() - t0
    Xe, ye = (X, y) if eval_train_n is None else (X[:eval_train_n], y[:eval_train_n])
    vb = min(batch_size, len(yv)) if len(yv) else 0
    curves = {"step": [], "train_loss": [], "val_loss": [], "val_error": [], "batch_loss": []}
    hyp = {"lr_quantiles": [], "l2_quantiles": []}
    acc = []
    start = 0
    if resume is not None:
        start = restore_curves(resume, steps, curves, hyp, record_hypers)
        arrays = resume[0]
        run.set_arrays({k[4:]: v for k, v in arrays.items() if k.startswith("run/")})
        acc = arrays["acc"].tolist()

    def save(step):
        if checkpoint is None:
            return
        arrays = {f"run/{k}": v for k, v in run.get_arrays().items()}
        arrays.update(curve_arrays(curves, hyp, record_hypers), acc=np.asarray(acc, float))
        save_checkpoint(checkpoint, arrays, {**(identity or {}), "step": step,
                                             "spent_s": before + time.perf_counter() - t0})

    def record(t):
        """Evaluate first, then append everything (an interruption leaves no half record)."""
        tl, _ = run.evaluate(Xe, ye, eval_batch)
        check_loss("training loss", tl, t)
        vl, ve = run.evaluate(Xv, yv, eval_batch)
        row = {"step": t, "train_loss": tl, "val_loss": vl, "val_error": ve,
               "batch_loss": float(np.mean(acc)) if acc else float("nan")}
        if record_hypers:
            a = run.state()
            row.update(lr_quantiles=block_quantiles(layout, method.lr_of(a)),
                       l2_quantiles=block_quantiles(layout, method.l2_of(a)))
        for k, v in row.items():
            (curves if k in curves else hyp)[k].append(v)
        acc.clear()

    def due(t):
        return record_due(t, eval_every, steps)

    t_eval = time.perf_counter()
    if due(start) and (not curves["step"] or curves["step"][-1] != start):
        record(start)                    # also a record an interruption fell before
    eval_s = time.perf_counter() - t_eval
    end = steps if stop_after is None else max(start, min(steps, int(stop_after)))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, initial=start, desc=desc or method.name, leave=False)
    step_s, done = 0.0, start
    try:
        with checkpointed(lambda: save(done)):
            for t in range(start, end):
                check_interrupt()                 # Ctrl-C takes effect here, never inside run.step
                i = batch_indices(len(y), batch_size, seed, t)
                vbatch = ()
                if method.needs_val:
                    j = batch_indices(len(yv), vb, seed + 1, t)
                    vbatch = (Xv[j], yv[j])
                ts = time.perf_counter()
                loss = run.step(X[i], y[i], *vbatch)["loss"]
                done = t + 1
                acc.append(loss)
                step_s += time.perf_counter() - ts
                if due(done):
                    te = time.perf_counter()
                    record(done)
                    eval_s += time.perf_counter() - te
                if bar is not None:
                    bar.update(1)
                if checkpoint_every and done % checkpoint_every == 0 and done < end:
                    save(done)
    finally:
        if bar is not None:
            bar.close()
    save(done)
    out = dict(curves)
    if record_hypers:
        out.update(hyp, blocks=list(layout.names), quantiles=list(QUANTILES))
    out["steps_done"] = done
    out["timings"] = {"compile_s": compile_s, "step_s_mean": step_s / max(done - start, 1), "eval_s": eval_s,
                      "spent_s": before + time.perf_counter() - t0}     # the whole run, also before a resume
    return out, run
