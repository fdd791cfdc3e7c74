"""DrMAD on the Theano backend: hypergradients of the validation loss through SGD
with momentum, for the MLP and DenseNet of ``gpu_ver.models`` (docs/ALGORITHMS.md s.2).

Forward (training; docs/ALGORITHMS.md eqs. 1-3, as ``cpu_ver.sgd``)::

    g_t     = grad_w L(w_t, l2; batch_t)          L = mean CE + sum_i l2_i w_i^2
    v_{t+1} = gamma_t v_t - (1 - gamma_t) g_t     gamma_t: the QUANTISED momentum n/2^16
    w_{t+1} = w_t + alpha_t v_{t+1}                (shared.exact_rep.quantised_momentum)

Only K + 1 snapshots ``w_{s_k}``, ``s_k = round(k T / K)``, are kept (K = 1:
``w_0`` and ``w_T``, DrMAD proper, memory independent of T; K = T: every
weight vector, which makes the reverse pass exact up to rounding).

Reverse (t = T-1 ... 0), ``gpu_ver.reversible.adjoint_step`` (the recursion of
``cpu_ver.reversible.adjoint_step``, as ``cpu_ver.drmad`` reuses it) with ``w_t`` replaced by the point of the piecewise-linear path
``w(t) = (1 - beta_t) w_{s_k} + beta_t w_{s_{k+1}}`` and the batch that step t
used::

    dalpha_t  = dw * v_{t+1},       v_{t+1} ~ (w(t+1) - w(t)) / alpha_t
    dv       += alpha_t dw
    u         = (1 - gamma_t) dv    (per-parameter momentum does not commute with H:
                                     the VJP is taken against u, not scaled afterwards)
    dgamma_t  = dv * (v_t + g_t),   v_t ~ (w(t) - w(t-1)) / alpha_{t-1}  (v_0 = 0)
    dw       -= H_t u               (FULL Hessian-vector product over every parameter:
                                     weights, biases, BN scales and shifts)
    dl2      -= 2 w(t) u            (the mixed term d grad_w L / d l2)
    dv       *= gamma_t

Options (``cpu_ver.drmad``'s): ``grid='t/T'`` (beta linear in t on each
segment) or ``'cumlr'`` (beta proportional, per block, to the cumulative
learning rate); ``velocity='reconstruct'`` (learning-rate and momentum
hypergradients as well) or ``'ignore'`` (L2 and initial scales only).

Where the work happens. Everything parameter-sized lives in Theano shared
variables: the training state ``w, v``, the snapshots ``S`` ((K+1, P)), the
reverse state ``w(t+1), w(t)``, the adjoints ``dw, dv``, the hypergradient
accumulators (per-parameter ``dl2``, per-(row, block) ``dlr``, ``dmomentum``), the
per-parameter L2 strengths and the (rows, blocks) tables of learning rates and
quantised momenta (``gpu_ver.reversible.DeviceHypers``). ONE compiled function does a whole forward step, ONE a
whole reverse step; their inputs are the minibatch, the step ``t``, the
segment index and the (per-block) interpolation weight, their outputs two
scalars (for the non-finite checks). No parameter-sized array crosses between
host and device during the T steps; set-up (hyperparameters, w0) and results
cross once per hypergradient. Every function is compiled once, in
``DrMAD.__init__``; a meta-loop changes only shared values.

Validation objective and batch norm. ``f(w) = sum_c (n_c / N) CE_c(w)``: the
validation split is cut, in a fixed order, into ``ceil(N / val_chunk)``
chunks of nearly equal size (``np.array_split``), and ``CE_c`` is the mean
cross-entropy of chunk c. For the MLP this is exactly the mean over the whole
split. For DenseNet every batch-norm layer normalises chunk c with chunk c's
own batch statistics, like a training step normalises with its batch's
statistics (no running averages anywhere in hypergradients; they never enter
training either): the objective is then a deterministic, smooth function of
the weights whose exact gradient (through the statistics) is what the reverse
pass starts from. Chunks of nearly equal size keep every chunk's statistics
well defined (no chunk of one example). In the reverse pass every step uses
the batch statistics of ITS minibatch at the interpolated weights w(t), as the
forward step did at w_t.
"""
from __future__ import annotations

import time

import numpy as np

from gpu_ver import config
from shared.errors import ConfigError, NonFiniteError
from shared.hyperparams import HyperParams, check_fits
from shared.reversal import HypergradResult

theano = config.load()
tt = theano.tensor
from gpu_ver import fncache  # noqa: E402 (after config.load)
from gpu_ver import models as M  # noqa: E402
from gpu_ver.problem import GROUPS, Problem, check_shapes, floatX, progress_bar, val_chunks  # noqa: E402,F401
from shared.datasets import batch_indices  # noqa: E402,F401 (step t's minibatch, as the problem draws it)
from gpu_ver.reversible import Adjoint, DeviceHypers, adjoint_step  # noqa: E402

GRIDS = ("t/T", "cumlr")
VELOCITIES = ("reconstruct", "ignore")


def checkpoint_steps(n_iters: int, K: int) -> np.ndarray:
    """s_k = round(k T / K), k = 0..K (K clipped to T): as ``cpu_ver.drmad.checkpoint_steps``."""
    if isinstance(K, bool) or not isinstance(K, (int, np.integer)) or K < 1:
        raise ConfigError(f"DrMAD needs at least one segment (K >= 1), got K={K!r}")
    K = min(int(K), int(n_iters))
    return np.unique(np.round(np.arange(K + 1) * n_iters / K).astype(int))


# --------------------------------------------------------------------------- engine
class DrMAD:
    """Compiled DrMAD for one problem and one set of hyperparameter SHAPES.

    ``hypergradient(hypers)`` runs forward then reverse for any container with
    the same group shapes (values may change: a meta-loop only sets shared
    values). ``forward(hypers, keep=...)`` runs training alone and returns the
    weights at the steps in ``keep`` (host copies; for cross-checks).
    """

    def __init__(self, problem: Problem, hypers: HyperParams, *, K: int = 1, grid: str = "t/T",
                 velocity: str = "reconstruct", hvp: str = M.DEFAULT_HVP):
        if grid not in GRIDS:
            raise ConfigError(f"DrMAD grid must be one of {GRIDS}, got {grid!r}")
        if velocity not in VELOCITIES:
            raise ConfigError(f"DrMAD velocity must be one of {VELOCITIES}, got {velocity!r}")
        M.check_hvp_method(hvp)
        check_fits(hypers, problem.layout, problem.n_iters)
        check_shapes(hypers.group("l2").shape, hypers.group("lr").shape, hypers.group("momentum").shape)
        self.problem, self.grid, self.velocity, self.hvp = problem, grid, velocity, hvp
        self.shapes = {n: hypers.group(n).shape for n in GROUPS}
        self.steps = checkpoint_steps(problem.n_iters, K)
        self.K = len(self.steps) - 1
        self.chunks = val_chunks(len(problem.y_val), problem.val_chunk)
        t0 = time.perf_counter()
        self._build(hypers)
        self.compile_s = time.perf_counter() - t0

    # -- graph ------------------------------------------------------------------------
    def _build(self, hypers):
        fx, P = floatX(), self.problem.layout.size
        lay, model = self.problem.layout, self.problem.model
        self.dh = dh = DeviceHypers(lay, hypers)
        self.l2 = dh.l2

        def sh(shape, name):
            return theano.shared(np.zeros(shape, fx), name=name)
        self.w, self.v = sh(P, "w"), sh(P, "v")
        self.S = sh((self.K + 1, P), "snapshots")
        self.w_next, self.w_cur = sh(P, "w_next"), sh(P, "w_cur")
        self.adj = Adjoint(sh(P, "dw"), sh(P, "dv"), dh.grads)
        self.dw, self.dv = self.adj.dw, self.adj.dv

        X, y = model.input_var("X"), tt.lvector("y")
        t, ka = tt.lscalar("t"), tt.lscalar("k")
        beta = tt.vector("beta", dtype=fx)
        weight = tt.scalar("weight", dtype=fx)

        def interp(k, b):
            """w(t) = (1 - beta) S[k] + beta S[k+1], beta per block."""
            be = b[dh.block_of]
            return (1 - be) * self.S[k] + be * self.S[k + 1]

        # forward step
        step = dh.step(t)
        g, nll, _ = M.symbolic_grad(model, self.w, X, y, step.l2)
        v_new = step.gamma * self.v - (1 - step.gamma) * g
        w_new = self.w + step.alpha * v_new
        loss = nll + tt.sum(step.l2 * tt.sqr(self.w))
        self.f_step = fncache.function([X, y, t], [loss, tt.abs_(w_new).sum()],
                                       updates=[(self.v, v_new), (self.w, w_new)], name="drmad_forward_step",
                                       on_unused_input="ignore")     # t is unused with scalar schedules
        self.f_store = fncache.function([ka], [], updates=[(self.S, tt.set_subtensor(self.S[ka], self.w))],
                                        name="drmad_store")

        # validation gradient (accumulated over chunks) and evaluation at w
        blocks = M.split(self.w, lay)
        logits, _ = model.forward(blocks, X, None)
        vnll = M.cross_entropy(logits, y)
        n_err = tt.neq(tt.argmax(logits, axis=1), y).sum()
        self.f_val = fncache.function([X, y, weight], [weight * vnll, n_err],
                                      updates=[(self.dw, self.dw + weight * M.flat(M.grad(vnll, blocks)))],
                                      name="drmad_val_grad")
        self._eval_graph = ([X, y], [vnll, n_err])
        self._f_eval = None

        # start of the reverse pass: zero the adjoints, w(T) = w_T, w(T-1) on the path
        zeros = [(a, tt.zeros_like(a)) for a in (self.dw, self.dv, *dh.grads.values())]
        self.f_reset = fncache.function([], [], updates=zeros, name="drmad_reset")
        self.f_prime = fncache.function([ka, beta], [], updates=[(self.w_next, self.w), (self.w_cur, interp(ka, beta))],
                                        name="drmad_prime")

        # reverse step: adjoint_step at w(t), with the velocities of the path
        w_t, w_prev = self.w_cur, interp(ka, beta)
        if self.velocity == "reconstruct":
            v_next = (self.w_next - w_t) / step.alpha                             # v_{t+1} ~ (w(t+1) - w(t)) / alpha_t
            alpha_prev = dh.per_param("lr", tt.maximum(t - 1, 0))
            v_t = tt.switch(tt.gt(t, 0), (w_t - w_prev) / alpha_prev, tt.zeros_like(w_prev))    # v_0 = 0

            def recover_v(g):
                return v_t
        else:
            v_next = None

            def recover_v(g):
                return None
        adj = self.adj.copy()
        _, nll_t = adjoint_step(model, dh, t, step, X, y, w_t, v_next, recover_v, adj, self.hvp)
        updates = [*dh.updates(adj.grads), (self.dw, adj.dw), (self.dv, adj.dv),
                   (self.w_next, w_t), (self.w_cur, w_prev)]
        self.f_reverse = fncache.function([X, y, t, ka, beta], [nll_t, tt.abs_(adj.dw).sum()], updates=updates,
                                          name="drmad_reverse_step", on_unused_input="ignore")
        self._fx = fx

    @property
    def f_eval(self):
        """(mean CE, n_errors) at ``w``: compiled on first use (only meta-loops evaluate)."""
        if self._f_eval is None:
            ins, outs = self._eval_graph
            self._f_eval = fncache.function(ins, outs, name="drmad_eval")
        return self._f_eval

    # -- host helpers --------------------------------------------------------------------------
    def _check_hypers(self, hypers):
        self.dh.check(hypers, self.problem.n_iters)

    def set_hypers(self, hypers: HyperParams, quantise: bool = True) -> None:
        """Copy L2 strengths and the learning-rate / momentum tables to the device (once per run)."""
        self._check_hypers(hypers)
        self._lr_host = self.dh.set(hypers, quantise)
        if self.grid == "cumlr":
            lr = self._lr_host if self._lr_host.shape[0] > 1 else np.repeat(self._lr_host, self.problem.n_iters, 0)
            self._cum = np.concatenate([np.zeros((1, lr.shape[1])), np.cumsum(lr, axis=0)])

    def _segment_args(self, t: int):
        """(k, beta) with w(t) = (1 - beta) S[k] + beta S[k+1]; beta per block (float vector)."""
        steps = self.steps
        k = int(np.searchsorted(steps, t, side="right")) - 1
        k = min(max(k, 0), len(steps) - 2)
        a, b = int(steps[k]), int(steps[k + 1])
        B = self.problem.layout.n_blocks
        if self.grid == "t/T" or t in (a, b):
            beta = np.full(B, (t - a) / (b - a))
        else:
            ca, cb = self._cum[a], self._cum[b]
            beta = (self._cum[t] - ca) / (cb - ca)
        return k, beta.astype(self._fx)

    def shared_bytes(self) -> int:
        """Bytes held in this engine's shared variables (device memory for the state)."""
        vs = [self.w, self.v, self.S, self.w_next, self.w_cur, self.dw, self.dv, *self.dh.shared_variables()]
        return int(sum(np.asarray(s.get_value(borrow=True)).nbytes for s in vs))

    # -- passes --------------------------------------------------------------------------------------
    def forward(self, hypers: HyperParams, *, keep=(), quantise: bool = True, progress: bool = False) -> dict:
        """Train from w0 for T steps, storing the K + 1 snapshots on the device.

        Returns {step: host copy of w_step} for the steps in ``keep`` (none by default).
        NonFiniteError naming the step when the loss or the new weights are NaN/inf.
        """
        self.set_hypers(hypers, quantise)
        p, fx = self.problem, self._fx
        keep = set(int(s) for s in keep)
        self.w.set_value(np.asarray(p.w0(hypers), fx))
        self.v.set_value(np.zeros(p.layout.size, fx))
        out = {0: self.w.get_value()} if 0 in keep else {}
        self.f_store(0)
        store_at = {int(s): k for k, s in enumerate(self.steps)}
        bar = progress_bar(p.n_iters, "drmad forward", progress)
        for t in range(p.n_iters):
            X, y = p.batch(t)
            loss, chk = self.f_step(X, y, t)
            if not (np.isfinite(loss) and np.isfinite(chk)):
                raise NonFiniteError("training loss" if not np.isfinite(loss) else "weights", t,
                                     f"loss {float(loss)}; lower the learning rate")
            if t + 1 in store_at:
                self.f_store(store_at[t + 1])
            if t + 1 in keep:
                out[t + 1] = self.w.get_value()
            bar.update(1)
        bar.close()
        return out

    def validation(self, accumulate_grad: bool) -> tuple:
        """(f(w), error rate) at the current weights ``w``; with ``accumulate_grad`` also dw += grad f."""
        p, N = self.problem, len(self.problem.y_val)
        total, errs = 0.0, 0
        for a, b in self.chunks:
            X, y = p.X_val[a:b], p.y_val[a:b]
            if accumulate_grad:
                l, e = self.f_val(X, y, np.asarray((b - a) / N, self._fx))
            else:
                l, e = self.f_eval(X, y)
                l = l * (b - a) / N
            total, errs = total + float(l), errs + int(e)
        return total, errs / N

    def evaluate(self, X, y, chunk=None) -> tuple:
        """(mean CE, error rate) at the current weights over (X, y), in near-equal chunks
        (batch statistics of each chunk in BN layers, as the validation objective)."""
        n = len(y)
        if n == 0:
            return float("nan"), float("nan")
        total, errs = 0.0, 0
        for a, b in val_chunks(n, chunk or self.problem.val_chunk):
            l, e = self.f_eval(X[a:b], y[a:b])
            total, errs = total + float(l) * (b - a), errs + int(e)
        return total / n, errs / n

    def hypergradient(self, hypers: HyperParams, *, progress: bool = False) -> HypergradResult:
        """Forward (K + 1 snapshots), validation gradient, reverse pass; gradients wrt the
        constrained hyperparameter values of every group this variant provides."""
        t_start = time.perf_counter()
        self.forward(hypers, progress=progress)
        t_fwd = time.perf_counter()
        p = self.problem
        w_T = np.asarray(self.w.get_value(), np.float64)
        self.f_reset()
        objective, val_err = self.validation(accumulate_grad=True)
        if not np.isfinite(objective):
            raise NonFiniteError("validation loss", p.n_iters, "after training")
        self.f_prime(*self._segment_args(p.n_iters - 1))
        bar = progress_bar(p.n_iters, "drmad reverse", progress)
        for t in reversed(range(p.n_iters)):
            X, y = p.batch(t)
            k, beta = self._segment_args(t - 1) if t >= 1 else (0, np.zeros(p.layout.n_blocks, self._fx))
            nll, chk = self.f_reverse(X, y, t, k, beta)
            if not np.isfinite(chk):
                raise NonFiniteError("hypergradient (dw)", t, f"training loss at w(t) {float(nll)}")
            bar.update(1)
        bar.close()
        t_rev = time.perf_counter()
        grads = self._collect(hypers)
        dw0 = np.asarray(self.dw.get_value(), np.float64)
        info = {"K": self.K, "grid": self.grid, "velocity": self.velocity, "stored_vectors": self.K + 1,
                "val_error": val_err, "forward_s": t_fwd - t_start, "reverse_s": t_rev - t_fwd,
                "floatX": self._fx}
        return HypergradResult(objective, grads, dw0, w_T, info)

    def _collect(self, hypers) -> dict:
        names = ("l2", "init_scale") + (("lr", "momentum") if self.velocity == "reconstruct" else ())
        return self.dh.collect(hypers, np.asarray(self.dw.get_value(), np.float64), self.problem.init_base(), names)

    def objective_after_training(self, hypers: HyperParams, quantise: bool = False) -> float:
        """f(w_T(hypers)) by plain training (unquantised momentum by default): what FD differentiates."""
        self.forward(hypers, quantise=quantise)
        self.f_reset()
        return self.validation(accumulate_grad=True)[0]


def hypergradient(problem: Problem, hypers: HyperParams, *, K: int = 1, grid: str = "t/T",
                  velocity: str = "reconstruct", hvp: str = M.DEFAULT_HVP, progress: bool = False) -> HypergradResult:
    """One-shot convenience: compile an engine and compute one hypergradient."""
    return DrMAD(problem, hypers, K=K, grid=grid, velocity=velocity, hvp=hvp).hypergradient(hypers,
                                                                                           progress=progress)
