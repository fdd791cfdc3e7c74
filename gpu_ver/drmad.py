"""DrMAD on the Theano backend: hypergradients of the validation loss through SGD
with momentum, for the MLP and DenseNet of ``gpu_ver.models`` (docs/ALGORITHMS.md s.2).

Forward (training; docs/ALGORITHMS.md eqs. 1-3, as ``cpu_ver.sgd``)::

    g_t     = grad_w L(w_t, l2; batch_t)          L = mean CE + sum_i l2_i w_i^2
    v_{t+1} = gamma_t v_t - (1 - gamma_t) g_t     gamma_t: the QUANTISED momentum n/2^16
    w_{t+1} = w_t + alpha_t v_{t+1}                (shared.exact_rep.quantised_momentum)

Only K + 1 snapshots ``w_{s_k}``, ``s_k = round(k T / K)``, are kept (K = 1:
``w_0`` and ``w_T``, DrMAD proper, memory independent of T; K = T: every
weight vector, which makes the reverse pass exact up to rounding).

Reverse (t = T-1 ... 0), the recursion of ``cpu_ver.reversible.adjoint_step``
with ``w_t`` replaced by the point of the piecewise-linear path
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
accumulators (per-parameter ``dl2``, per-(row, block) ``dlr``, ``dmom``), the
per-parameter L2 strengths and the (rows, blocks) tables of learning rates and
quantised momenta. ONE compiled function does a whole forward step, ONE a
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
from dataclasses import dataclass, field

import numpy as np

from gpu_ver import config
from shared.datasets import Dataset, batch_indices
from shared.errors import ConfigError, NonFiniteError
from shared.exact_rep import quantised_momentum
from shared.hyperparams import HyperParams, check_fits, standard

theano = config.load()
T = theano.tensor
from gpu_ver import fncache  # noqa: E402 (after config.load)
from gpu_ver import models as M  # noqa: E402

GRIDS = ("t/T", "cumlr")
VELOCITIES = ("reconstruct", "ignore")
L2_SHAPES = ("scalar", "block", "unit", "param")
SCHEDULE_SHAPES = ("scalar", "block", "iter", "iter_block")
GROUPS = ("l2", "lr", "momentum", "init_scale")


def floatX() -> str:
    return str(theano.config.floatX)


def checkpoint_steps(n_iters: int, K: int) -> np.ndarray:
    """s_k = round(k T / K), k = 0..K (K clipped to T): as ``cpu_ver.drmad.checkpoint_steps``."""
    if isinstance(K, bool) or not isinstance(K, (int, np.integer)) or K < 1:
        raise ConfigError(f"DrMAD needs at least one segment (K >= 1), got K={K!r}")
    K = min(int(K), int(n_iters))
    return np.unique(np.round(np.arange(K + 1) * n_iters / K).astype(int))


def val_chunks(n: int, chunk: int) -> list:
    """(start, stop) of ceil(n / chunk) consecutive chunks of nearly equal size."""
    if chunk < 1:
        raise ConfigError(f"validation chunk size must be positive, got {chunk}")
    k = max(1, -(-n // chunk))
    bounds = np.concatenate([[0], np.cumsum([len(a) for a in np.array_split(np.arange(n), k)])])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


# --------------------------------------------------------------------------- problem
@dataclass(frozen=True, eq=False)
class Problem:
    """Model, data splits (already in the model's input form), T, batch and seeds.

    Step t uses minibatch ``batch_indices(n_train, batch_size, batch_seed, t)``
    (as ``cpu_ver.problem.Problem``). Initial weights ``w0 = expand(s) * base``
    with per-block scales ``s`` (the ``init_scale`` group): for the MLP ``base``
    is the fixed standard-normal draw of ``MLPSpec.init_noise(init_seed)`` and
    the default scales are ``MLPSpec.default_init_scales()`` (so w0 equals
    cpu_ver's); for DenseNet ``base = DenseNet.init(init_seed)`` (He-normal
    convolutions, BN scale 1 and shift 0) and the default scales are 1.
    """

    model: object
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    n_iters: int
    batch_size: int
    batch_seed: int = 0
    init_seed: int = 0
    X_test: np.ndarray = None
    y_test: np.ndarray = None
    val_chunk: int = 1000
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        fx = floatX()
        conv = self.is_densenet
        for name in ("X_train", "X_val", "X_test"):
            X = getattr(self, name)
            if X is None:
                continue
            X = np.asarray(X)
            if not conv and X.ndim > 2:
                X = X.reshape(len(X), -1)
            object.__setattr__(self, name, np.ascontiguousarray(X, dtype=fx))
        for name in ("y_train", "y_val", "y_test"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.int64))
        self.model.check_data(self.X_train, self.y_train, "training split")
        self.model.check_data(self.X_val, self.y_val, "validation split")
        if isinstance(self.n_iters, bool) or not isinstance(self.n_iters, (int, np.integer)) or self.n_iters < 1:
            raise ConfigError(f"the number of training steps must be a positive integer, got {self.n_iters!r}")
        if not 0 < self.batch_size <= len(self.y_train):
            raise ConfigError(f"batch size {self.batch_size} must be in [1, {len(self.y_train)}] "
                              f"(the training split has {len(self.y_train)} examples)")
        if len(self.y_val) == 0:
            raise ConfigError("the validation split is empty")
        if conv and self.val_chunk < 2:
            raise ConfigError("with batch norm every validation chunk needs at least 2 examples")

    @classmethod
    def from_dataset(cls, model, data: Dataset, **kw) -> "Problem":
        return cls(model, data.train.X, data.train.y, data.val.X, data.val.y,
                   X_test=data.test.X, y_test=data.test.y, **kw)

    @property
    def is_densenet(self) -> bool:
        return getattr(self.model, "n_bn", 0) > 0

    @property
    def layout(self):
        return self.model.layout

    def batch(self, t: int):
        idx = batch_indices(len(self.y_train), self.batch_size, self.batch_seed, t)
        return self.X_train[idx], self.y_train[idx]

    def init_base(self) -> np.ndarray:
        if "base" not in self._cache:
            m = self.model
            self._cache["base"] = m.init(self.init_seed) if self.is_densenet else m.init_noise(self.init_seed)
        return self._cache["base"]

    def default_init_scales(self) -> np.ndarray:
        if self.is_densenet:
            return np.ones(self.layout.n_blocks)
        return self.model.default_init_scales()

    def w0(self, hypers: HyperParams) -> np.ndarray:
        return self.layout.expand(hypers.value("init_scale")) * self.init_base()

    def hypers(self, *, lr=0.1, momentum=0.9, l2=1e-4, init_scales=None, groups=("l2",), l2_shape="param",
               lr_shape="scalar", momentum_shape="scalar", l2_on="all") -> HyperParams:
        """A ``shared.hyperparams.standard`` container for this problem (checked shapes)."""
        check_shapes(l2_shape, lr_shape, momentum_shape)
        return standard(self.layout, self.n_iters, lr=lr, momentum=momentum, l2=l2,
                        init_scales=self.default_init_scales() if init_scales is None else init_scales,
                        groups=groups, l2_shape=l2_shape, lr_shape=lr_shape, momentum_shape=momentum_shape,
                        l2_on=l2_on)

    def describe(self) -> dict:
        return {"model": self.model.describe(), "n_params": self.layout.size, "n_iters": int(self.n_iters),
                "batch_size": int(self.batch_size), "batch_seed": int(self.batch_seed),
                "init_seed": int(self.init_seed), "n_train": len(self.y_train), "n_val": len(self.y_val),
                "val_chunk": int(self.val_chunk)}


def check_shapes(l2_shape, lr_shape, momentum_shape) -> None:
    if l2_shape not in L2_SHAPES:
        raise ConfigError(f"L2 shape must be one of {L2_SHAPES} (fixed during training), got {l2_shape!r}")
    for what, s in (("learning-rate", lr_shape), ("momentum", momentum_shape)):
        if s not in SCHEDULE_SHAPES:
            raise ConfigError(f"{what} shape must be one of {SCHEDULE_SHAPES}, got {s!r}")


def _table(hypers: HyperParams, name: str, quantise: bool = False) -> np.ndarray:
    """(rows, blocks) table whose row ``t`` (or row 0 when rows == 1) holds step t's per-block values."""
    g = hypers.group(name)
    h, B = np.asarray(g.value, float), hypers.layout.n_blocks
    if g.shape == "scalar":
        tab = np.full((1, B), float(h))
    elif g.shape == "block":
        tab = h[None, :].copy()
    elif g.shape == "iter":
        tab = np.repeat(h[:, None], B, axis=1)
    elif g.shape == "iter_block":
        tab = h.copy()
    else:
        raise ConfigError(f"hyperparameter {name!r}: shape {g.shape!r} is not a schedule shape {SCHEDULE_SHAPES}")
    return quantised_momentum(tab) if quantise else tab


def _from_table(shape: str, G: np.ndarray) -> np.ndarray:
    """Adjoint of ``_table``: the gradient wrt the group's values from a table gradient."""
    if shape == "scalar":
        return np.asarray(G.sum())
    if shape == "block":
        return G[0].copy()
    if shape == "iter":
        return G.sum(axis=1)
    return G.copy()


# --------------------------------------------------------------------------- results
@dataclass
class Result:
    objective: float          # f(w_T): validation loss (chunked, see the module docstring)
    grads: dict               # group -> gradient wrt the CONSTRAINED values (group's shape)
    grad_w0: np.ndarray       # df/dw0
    info: dict


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
        B = lay.n_blocks
        rows_lr = _table(hypers, "lr").shape[0]
        rows_m = _table(hypers, "momentum").shape[0]
        z = lambda *s: np.zeros(s, fx)  # noqa: E731
        sh = lambda a, n: theano.shared(a, name=n)  # noqa: E731
        self.w, self.v = sh(z(P), "w"), sh(z(P), "v")
        self.S = sh(z(self.K + 1, P), "snapshots")
        self.l2 = sh(z(P), "l2")
        self.lr_tab, self.mom_tab = sh(z(rows_lr, B), "lr_table"), sh(z(rows_m, B), "momentum_table")
        self.block_of = theano.shared(lay.block_of().astype(np.int64), name="block_of")
        self.w_next, self.w_cur = sh(z(P), "w_next"), sh(z(P), "w_cur")
        self.dw, self.dv, self.dl2 = sh(z(P), "dw"), sh(z(P), "dv"), sh(z(P), "dl2")
        self.dlr, self.dmom = sh(z(rows_lr, B), "dlr"), sh(z(rows_m, B), "dmomentum")

        X, y = model.input_var("X"), T.lvector("y")
        t, ka = T.lscalar("t"), T.lscalar("k")
        beta = T.vector("beta", dtype=fx)
        weight = T.scalar("weight", dtype=fx)

        def row(tab, rows, i):
            return tab[0] if rows == 1 else tab[i]

        def expand(r):
            return r[self.block_of]

        def blocksum(x):
            return M.block_sums(x, lay)

        def interp(k, b):
            be = expand(b)
            return (1 - be) * self.S[k] + be * self.S[k + 1]

        alpha = expand(row(self.lr_tab, rows_lr, t))
        gamma = expand(row(self.mom_tab, rows_m, t))

        # forward step
        g, nll, _ = M.symbolic_grad(model, self.w, X, y, self.l2)
        v_new = gamma * self.v - (1 - gamma) * g
        w_new = self.w + alpha * v_new
        loss = nll + T.sum(self.l2 * T.sqr(self.w))
        self.f_step = fncache.function([X, y, t], [loss, T.abs_(w_new).sum()],
                                       updates=[(self.v, v_new), (self.w, w_new)], name="drmad_forward_step",
                                       on_unused_input="ignore")     # t is unused with scalar schedules
        self.f_store = fncache.function([ka], [], updates=[(self.S, T.set_subtensor(self.S[ka], self.w))],
                                        name="drmad_store")

        # validation gradient (accumulated over chunks) and evaluation at w
        blocks = M.split(self.w, lay)
        logits, _ = model.forward(blocks, X, None)
        vnll = M.cross_entropy(logits, y)
        n_err = T.neq(T.argmax(logits, axis=1), y).sum()
        self.f_val = fncache.function([X, y, weight], [weight * vnll, n_err],
                                      updates=[(self.dw, self.dw + weight * M.flat(M.grad(vnll, blocks)))],
                                      name="drmad_val_grad")
        self._eval_graph = ([X, y], [vnll, n_err])
        self._f_eval = None

        # start of the reverse pass: zero the adjoints, w(T) = w_T, w(T-1) on the path
        zeros = [(a, T.zeros_like(a)) for a in (self.dw, self.dv, self.dl2, self.dlr, self.dmom)]
        self.f_reset = fncache.function([], [], updates=zeros, name="drmad_reset")
        self.f_prime = fncache.function([ka, beta], [], updates=[(self.w_next, self.w), (self.w_cur, interp(ka, beta))],
                                        name="drmad_prime")

        # reverse step
        reconstruct = self.velocity == "reconstruct"
        updates = []
        dw, dv = self.dw, self.dv
        if reconstruct:
            v_next = (self.w_next - self.w_cur) / alpha
            updates.append((self.dlr, T.inc_subtensor(self.dlr[0 if rows_lr == 1 else t], blocksum(dw * v_next))))
        dv1 = dv + alpha * dw
        u = (1 - gamma) * dv1
        g_t, nll_t, hv, mix = M.symbolic_grad_and_hvp(model, self.w_cur, X, y, self.l2, u, self.hvp)
        w_prev = interp(ka, beta)
        if reconstruct:
            alpha_prev = expand(row(self.lr_tab, rows_lr, T.maximum(t - 1, 0)))
            v_t = T.switch(T.gt(t, 0), (self.w_cur - w_prev) / alpha_prev, T.zeros_like(w_prev))
            updates.append((self.dmom, T.inc_subtensor(self.dmom[0 if rows_m == 1 else t],
                                                       blocksum(dv1 * (v_t + g_t)))))
        dw_new = dw - hv
        updates += [(self.dl2, self.dl2 - mix), (self.dw, dw_new), (self.dv, gamma * dv1),
                    (self.w_next, self.w_cur), (self.w_cur, w_prev)]
        self.f_reverse = fncache.function([X, y, t, ka, beta], [nll_t, T.abs_(dw_new).sum()], updates=updates,
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
        check_fits(hypers, self.problem.layout, self.problem.n_iters)
        got = {n: hypers.group(n).shape for n in GROUPS}
        if got != self.shapes:
            raise ConfigError(f"hyperparameter shapes {got} differ from the compiled ones {self.shapes}")

    def set_hypers(self, hypers: HyperParams, quantise: bool = True) -> None:
        """Copy L2 strengths and the learning-rate / momentum tables to the device (once per run)."""
        self._check_hypers(hypers)
        fx = self._fx
        self.l2.set_value(np.asarray(hypers.per_param("l2"), fx))
        self._lr_host = _table(hypers, "lr")
        self.lr_tab.set_value(self._lr_host.astype(fx))
        self.mom_tab.set_value(_table(hypers, "momentum", quantise).astype(fx))
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
        vs = [self.w, self.v, self.S, self.l2, self.lr_tab, self.mom_tab, self.block_of, self.w_next, self.w_cur,
              self.dw, self.dv, self.dl2, self.dlr, self.dmom]
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
        bar = _bar(p.n_iters, "drmad forward", progress)
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

    def hypergradient(self, hypers: HyperParams, *, progress: bool = False) -> Result:
        """Forward (K + 1 snapshots), validation gradient, reverse pass; gradients wrt the
        constrained hyperparameter values of every group this variant provides."""
        t_start = time.perf_counter()
        self.forward(hypers, progress=progress)
        t_fwd = time.perf_counter()
        p = self.problem
        self.f_reset()
        objective, val_err = self.validation(accumulate_grad=True)
        if not np.isfinite(objective):
            raise NonFiniteError("validation loss", p.n_iters, "after training")
        self.f_prime(*self._segment_args(p.n_iters - 1))
        bar = _bar(p.n_iters, "drmad reverse", progress)
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
        return Result(objective, grads, dw0, info)

    def _collect(self, hypers) -> dict:
        grads = {"l2": hypers.reduce("l2", np.asarray(self.dl2.get_value(), np.float64))}
        dw0 = np.asarray(self.dw.get_value(), np.float64)
        grads["init_scale"] = hypers.reduce("init_scale", dw0 * self.problem.init_base())
        if self.velocity == "reconstruct":
            grads["lr"] = _from_table(self.shapes["lr"], np.asarray(self.dlr.get_value(), np.float64))
            grads["momentum"] = _from_table(self.shapes["momentum"], np.asarray(self.dmom.get_value(), np.float64))
        return grads

    def objective_after_training(self, hypers: HyperParams, quantise: bool = False) -> float:
        """f(w_T(hypers)) by plain training (unquantised momentum by default): what FD differentiates."""
        self.forward(hypers, quantise=quantise)
        self.f_reset()
        return self.validation(accumulate_grad=True)[0]


def _bar(total, desc, enabled):
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def hypergradient(problem: Problem, hypers: HyperParams, *, K: int = 1, grid: str = "t/T",
                  velocity: str = "reconstruct", hvp: str = M.DEFAULT_HVP, progress: bool = False) -> Result:
    """One-shot convenience: compile an engine and compute one hypergradient."""
    return DrMAD(problem, hypers, K=K, grid=grid, velocity=velocity, hvp=hvp).hypergradient(hypers,
                                                                                           progress=progress)


# --------------------------------------------------------------------------- memory
def _memory_child(T_steps: int, layers: str, batch: int, seed: int) -> dict:
    """Run in a fresh process: DrMAD (K = 1, scalar schedules, per-unit L2) on the digits MLP
    for ``T_steps`` steps; memory figures of the hypergradient call."""
    import resource  # noqa: PLC0415
    import tracemalloc  # noqa: PLC0415

    from shared.datasets import load  # noqa: PLC0415
    from shared.mlp_spec import parse_layers  # noqa: PLC0415

    data = load("digits", seed=seed)
    model = M.MLP(parse_layers(layers), "tanh")
    problem = Problem.from_dataset(model, data, n_iters=T_steps, batch_size=batch, batch_seed=seed, init_seed=seed)
    hypers = problem.hypers(lr=0.1, momentum=0.9, l2=1e-4, l2_shape="unit")
    engine = DrMAD(problem, hypers, K=1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    engine.hypergradient(hypers)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"T": int(T_steps), "n_params": problem.layout.size, "maxrss_bytes": int(after),
            "maxrss_before_bytes": int(before), "maxrss_growth_bytes": int(after - before),
            "tracemalloc_peak_bytes": int(peak), "shared_bytes": engine.shared_bytes(), "seconds": seconds,
            "floatX": floatX(), "device": str(theano.config.device)}


def measure_memory(steps=(100, 1000, 10000), *, layers="64,50,10", batch=50, seed=0, progress=False) -> list:
    """Peak memory of one DrMAD hypergradient (K = 1) for each T in ``steps``, each in its own
    process (so ``ru_maxrss`` is that run's peak): rows with ``maxrss_bytes`` (process peak,
    including Python, Theano and the compiled modules), ``maxrss_growth_bytes`` (growth of the
    peak during the hypergradient), ``tracemalloc_peak_bytes`` (peak of Python/numpy
    allocations during it) and ``shared_bytes`` (the engine's Theano shared variables)."""
    import json  # noqa: PLC0415
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, HPO_FLOATX=floatX(),
               HPO_DEVICE="cuda" if str(theano.config.device).startswith("cuda") else "cpu",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = []
    for n in steps:
        code = (f"import json; from gpu_ver import drmad; "
                f"print('MEMORY ' + json.dumps(drmad._memory_child({int(n)}, {str(layers)!r}, {int(batch)}, {int(seed)})))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("MEMORY ")]
        if r.returncode != 0 or not line:
            raise RuntimeError(f"memory measurement for T={n} failed (exit {r.returncode}): {r.stderr[-2000:]}")
        rows.append(json.loads(line[-1][len("MEMORY "):]))
        if progress:
            print(f"  T={n}: peak RSS {rows[-1]['maxrss_bytes'] / 2**20:.1f} MiB", flush=True)
    return rows


def print_memory_table(rows) -> None:
    print(f"{'T':>7} {'peak RSS MiB':>13} {'RSS growth MiB':>15} {'tracemalloc peak KiB':>21} "
          f"{'shared KiB':>11} {'seconds':>8}")
    for r in rows:
        print(f"{r['T']:>7} {r['maxrss_bytes'] / 2**20:>13.1f} {r['maxrss_growth_bytes'] / 2**20:>15.2f} "
              f"{r['tracemalloc_peak_bytes'] / 2**10:>21.1f} {r['shared_bytes'] / 2**10:>11.1f} {r['seconds']:>8.2f}")
