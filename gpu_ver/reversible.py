"""Exact reverse-mode hypergradients through SGD with momentum on the Theano backend.

Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter Optimization
through Reversible Learning", ICML 2015, Algorithms 1 and 2 (docs/ALGORITHMS.md s.1,
eqs. 1-3 forward and 4-13 reverse), for the MLP and DenseNet of ``gpu_ver.models``;
the same names, signatures and result type as ``cpu_ver.reversible``.

Forward, in exact fixed-point arithmetic (``shared.exact_rep``)::

    g_t     = grad_w L(w_t, lambda; batch_t)
    v_{t+1} = gamma_t v_t - (1 - gamma_t) g_t        (multiplication by gamma pushes
    w_{t+1} = w_t + alpha_t v_{t+1}                   the lost bits into the buffer)

Reverse, t = T-1 ... 0, starting from dw = grad f(w_T), dv = 0::

    dalpha_t  = dw * v_{t+1}
    w_t       = w_{t+1} - alpha_t v_{t+1}                         (exact)
    dv       += alpha_t dw
    g_t, H_t u, M_t^T u    = one VJP of grad_w L at w_t, u = (1 - gamma_t) dv  (M = d grad / d lambda)
    v_t       = (v_{t+1} + (1 - gamma_t) g_t) / gamma_t           (exact, pops the buffer)
    dgamma_t  = dv * (v_t + g_t)
    dw       -= H_t ((1 - gamma_t) dv)      (per-parameter gamma: H and diag(gamma)
    dlambda  -= M_t^T ((1 - gamma_t) dv)     do not commute, so the VJP takes (1-gamma) dv)
    dv       *= gamma_t

Where the work happens. The exact state ``W``, ``V`` (int64 fixed point and the
information buffer) stays on the host, in ``shared.exact_rep``'s compiled
kernels. Each forward step sends the float weights ``w_t`` to the device and
gets ``g_t`` back from the compiled gradient (``gpu_ver.models.Functions.grad``,
the function that also gives the validation gradient). Each reverse step is ONE
compiled function, ``adjoint_step`` below as a Theano graph: its inputs are the
minibatch, ``t``, ``w_t`` and ``v_{t+1}`` (both recovered exactly on the host),
its outputs ``g_t`` (for the exact division of eq. 6 on the host) and two
scalars; the adjoints ``dw, dv`` and the hypergradient accumulators (``dl2`` per
parameter, ``dlr``, ``dmomentum`` per (row, block) of the schedule tables) live
in shared variables, as in ``gpu_ver.drmad``. In that graph the momentum term
uses ``v_t + g_t = (v_{t+1} + g_t) / gamma_t`` (eq. 6 rearranged) in floating
point: it differs from the exact ``v_t`` of the host by rounding only.

Bit-exact reversal needs the ``g_t`` of the reverse step's graph to be the same
float, bit for bit, as the forward gradient's, although the two are different
compiled functions; on the C backend they are with ``hvp="ror"`` (the gradient
subgraph is the same ops on the same inputs, BLAS calls of the same shapes; tests
check it, and the per-step fingerprints would name the step where it failed). With
``hvp="rop"`` they are not on the DenseNet (the R-operator's nodes read the
gradient's intermediates, and the optimiser then rewrites the shared subgraph
differently: about half the entries differ by 1e-17), so the exact division takes
``g_t`` from the forward pass's own compiled gradient, one more gradient per
reverse step; the reverse graph's ``g_t`` only enters dgamma (rounding). ``info`` reports the
buffer in bits against the information floor.

Hyperparameters: everything ``gpu_ver.drmad`` supports (L2 per parameter, unit,
block or scalar; learning rates and momenta scalar, per block, per iteration or
per iteration x block; per-block initial scales, batch-norm blocks included);
the gradients are with respect to the constrained values, the momentum's with
respect to the quantised momentum n/2^16 that training applies. The validation
objective is ``gpu_ver.drmad``'s (chunks, batch statistics per chunk).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from gpu_ver import config
from shared.errors import ConfigError, NonFiniteError, check_finite
from shared.exact_rep import ExactRep
from shared.hyperparams import HyperParams, check_fits
from shared.reversal import (HypergradResult, Trajectory, check_recovered, check_step, fingerprint,
                             fingerprint_keys, information_floor_bits as _floor, reversal_info)
from shared.schedule import schedule

theano = config.load()
tt = theano.tensor
from gpu_ver import fncache  # noqa: E402 (after config.load)
from gpu_ver import models as M  # noqa: E402
from gpu_ver.problem import (GROUPS, Problem, check_shapes, floatX, progress_bar, schedule_table,  # noqa: E402
                             table_grad, val_chunks)

ACCUMULATED = ("lr", "momentum", "l2")      # the groups adjoint_step accumulates (init_scale: at the end)


@dataclass
class Adjoint:
    """Reverse-mode state: dw, dv and the per-group hypergradients being accumulated
    (``cpu_ver.reversible.Adjoint``). Held as shared variables by an engine; inside
    ``adjoint_step`` a copy's fields become the symbolic new values."""
    dw: object
    dv: object
    grads: dict = field(default_factory=dict)

    def copy(self) -> "Adjoint":
        return Adjoint(self.dw, self.dv, dict(self.grads))


@dataclass
class SymbolicStep:
    """Per-parameter symbolic hyperparameters of step t (``shared.schedule.Step``'s fields)."""
    alpha: object
    gamma: object
    l2: object


class DeviceHypers:
    """The hyperparameters of one set of group shapes on the device, as ``adjoint_step``
    uses them (the symbolic counterpart of ``shared.hyperparams.HyperParams``).

    Shared variables: the per-parameter L2 strengths ``l2``, the (rows, blocks) tables of
    learning rates and quantised momenta (``gpu_ver.problem.schedule_table``), ``block_of``
    and the accumulators ``grads`` (``dl2`` per parameter, ``dlr`` / ``dmomentum`` per row
    and block). ``step(t)`` is step t's ``SymbolicStep``; ``accumulate`` adds a
    per-parameter term, reduced to the group's shape, to a group's symbolic total.
    """

    def __init__(self, layout, hypers: HyperParams):
        check_shapes(hypers.group("l2").shape, hypers.group("lr").shape, hypers.group("momentum").shape)
        self.layout, self.fx = layout, floatX()
        self.shapes = {n: hypers.group(n).shape for n in GROUPS}
        self.rows = {n: schedule_table(hypers, n).shape[0] for n in ("lr", "momentum")}
        P, B, fx = layout.size, layout.n_blocks, self.fx

        def sh(shape, name):
            return theano.shared(np.zeros(shape, fx), name=name)
        self.l2 = sh(P, "l2")
        self.tables = {"lr": sh((self.rows["lr"], B), "lr_table"),
                       "momentum": sh((self.rows["momentum"], B), "momentum_table")}
        self.block_of = theano.shared(layout.block_of().astype(np.int64), name="block_of")
        self.grads = {"l2": sh(P, "dl2"), "lr": sh((self.rows["lr"], B), "dlr"),
                      "momentum": sh((self.rows["momentum"], B), "dmomentum")}

    def _row(self, name, t):
        return 0 if self.rows[name] == 1 else t

    def per_param(self, name, t):
        """Step t's per-parameter values of a schedule group (its table row, expanded)."""
        return self.tables[name][self._row(name, t)][self.block_of]

    def step(self, t) -> SymbolicStep:
        return SymbolicStep(self.per_param("lr", t), self.per_param("momentum", t), self.l2)

    def accumulate(self, grads: dict, name: str, value, t) -> None:
        """grads[name] += value reduced to the group's shape (per parameter for L2, per
        block into row t of a schedule table)."""
        if name == "l2":
            grads[name] = grads[name] + value
        else:
            grads[name] = tt.inc_subtensor(grads[name][self._row(name, t)], M.block_sums(value, self.layout))

    def updates(self, grads: dict, names=ACCUMULATED) -> list:
        """(accumulator, new total) for the groups a graph changed."""
        return [(self.grads[n], grads[n]) for n in names if grads[n] is not self.grads[n]]

    def check(self, hypers: HyperParams, n_iters: int) -> None:
        check_fits(hypers, self.layout, n_iters)
        got = {n: hypers.group(n).shape for n in GROUPS}
        if got != self.shapes:
            raise ConfigError(f"hyperparameter shapes {got} differ from the compiled ones {self.shapes}")

    def set(self, hypers: HyperParams, quantise: bool = True) -> np.ndarray:
        """Copy the L2 strengths and the schedule tables to the device; returns the
        learning-rate table (host)."""
        fx = self.fx
        self.l2.set_value(np.asarray(hypers.per_param("l2"), fx))
        lr = schedule_table(hypers, "lr")
        self.tables["lr"].set_value(lr.astype(fx))
        self.tables["momentum"].set_value(schedule_table(hypers, "momentum", quantise).astype(fx))
        return lr

    def zero(self) -> None:
        for s in self.grads.values():
            s.set_value(np.zeros_like(s.get_value(borrow=True)))

    def collect(self, hypers: HyperParams, dw0: np.ndarray, init_base: np.ndarray, names=GROUPS) -> dict:
        """The hypergradients of ``names`` from the accumulators; the initial scales by
        d w0 / d scale_b = base on block b (``cpu_ver.reversible.finish``)."""
        host = {n: np.asarray(s.get_value(), np.float64) for n, s in self.grads.items()}
        out = {"l2": hypers.reduce("l2", host["l2"]), "init_scale": hypers.reduce("init_scale", dw0 * init_base)}
        for n in ("lr", "momentum"):
            out[n] = table_grad(self.shapes[n], host[n])
        return {n: out[n] for n in names}

    def shared_variables(self) -> list:
        return [self.l2, *self.tables.values(), self.block_of, *self.grads.values()]


def adjoint_step(model, hypers: DeviceHypers, t, step: SymbolicStep, X, y, w_t, v_next, recover_v,
                 adj: Adjoint, hvp: str = M.DEFAULT_HVP):
    """One reverse step of the hypergradient recursion as a Theano graph (shared by exact
    reversal and DrMAD): ``cpu_ver.reversible.adjoint_step`` line for line::

        dalpha_t  = dw * v_{t+1}
        dv       += alpha_t dw
        g_t, H_t u, M_t^T u = one VJP of grad_w L at w_t, u = (1 - gamma_t) dv
        dgamma_t  = dv * (v_t + g_t)
        dw       -= H_t u;   dlambda -= M_t^T u;   dv *= gamma_t

    ``recover_v(g_t)`` returns v_t (or None to skip the momentum term) given the gradient
    at w_t; ``v_next`` None skips the learning-rate term. The gradient and both
    second-order terms come from ONE vector-Jacobian product of grad_w L with respect
    to (w, lambda) (``hvp``: reverse over reverse or forward over reverse,
    ``gpu_ver.models.symbolic_grad_and_hvp``). ``adj`` gets the symbolic new values;
    returns ``(g_t, nll_t)``.
    """
    one_minus = 1 - step.gamma
    if v_next is not None:
        hypers.accumulate(adj.grads, "lr", adj.dw * v_next, t)
    dv = adj.dv + step.alpha * adj.dw
    # H and diag(1 - gamma) do not commute when the momentum differs between parameters:
    # the VJP is taken against (1 - gamma) * dv, not scaled afterwards.
    g, nll, hv, mv = M.symbolic_grad_and_hvp(model, w_t, X, y, step.l2, one_minus * dv, hvp)
    v_t = recover_v(g)
    if v_t is not None:
        hypers.accumulate(adj.grads, "momentum", dv * (v_t + g), t)
    hypers.accumulate(adj.grads, "l2", -mv, t)
    adj.dw = adj.dw - hv
    adj.dv = step.gamma * dv
    return g, nll


class Reversible:
    """Compiled exact reversal for one problem and one set of hyperparameter SHAPES.

    ``hypergradient(hypers)`` runs the exact forward and reverse passes for any
    container with the same group shapes (as ``gpu_ver.drmad.DrMAD``). ``buffer``:
    ``shared.exact_rep``'s buffer ('vector', 'numpy' or 'int'); ``hvp``: 'ror' or 'rop'
    (``gpu_ver.models.symbolic_grad_and_hvp``).
    """

    velocity = "reconstruct"     # every group has a hypergradient (``meta.run`` asks every engine)

    def __init__(self, problem: Problem, hypers: HyperParams, *, buffer: str = "vector", hvp: str = M.DEFAULT_HVP):
        M.check_hvp_method(hvp)
        check_fits(hypers, problem.layout, problem.n_iters)
        check_shapes(hypers.group("l2").shape, hypers.group("lr").shape, hypers.group("momentum").shape)
        if buffer not in ("vector", "numpy", "int"):
            raise ConfigError(f"buffer must be one of vector, numpy, int, got {buffer!r}")
        self.problem, self.buffer, self.hvp = problem, buffer, hvp
        self.shapes = {n: hypers.group(n).shape for n in GROUPS}
        self.chunks = val_chunks(len(problem.y_val), problem.val_chunk)
        self.fns = M.Functions(problem.model)
        self._f_eval, self._w_eval = None, None
        t0 = time.perf_counter()
        self._build(hypers)
        self.fns.grad(np.zeros(problem.layout.size), 0.0, *problem.batch(0))    # compile the gradient now
        self.compile_s = time.perf_counter() - t0

    # -- graph ------------------------------------------------------------------------------
    def _build(self, hypers):
        fx, lay, model = floatX(), self.problem.layout, self.problem.model
        self._fx = fx
        self.dh = dh = DeviceHypers(lay, hypers)
        self.l2 = dh.l2
        P = lay.size
        self.adj = Adjoint(theano.shared(np.zeros(P, fx), name="dw"), theano.shared(np.zeros(P, fx), name="dv"),
                           dh.grads)
        X, y, t = model.input_var("X"), tt.lvector("y"), tt.lscalar("t")
        w_t, v_next = tt.vector("w_t", dtype=fx), tt.vector("v_next", dtype=fx)
        step = dh.step(t)
        # v_t = (v_{t+1} + g_t) / gamma_t - g_t (eq. 6), in floating point; the graph's
        # v_t + g_t simplifies to (v_{t+1} + g_t) / gamma_t, which differs from the exact v_t
        # of the host by rounding only.
        adj = self.adj.copy()
        g, nll = adjoint_step(model, dh, t, step, X, y, w_t, v_next, lambda g: (v_next + g) / step.gamma - g,
                              adj, self.hvp)
        updates = [(self.adj.dw, adj.dw), (self.adj.dv, adj.dv), *dh.updates(adj.grads, ("l2", "lr", "momentum"))]
        self.f_reverse = fncache.function([X, y, t, w_t, v_next], [g, nll, tt.abs_(adj.dw).sum()], updates=updates,
                                          name="exact_reverse_step", on_unused_input="ignore")

    @property
    def f_eval(self):
        """(mean CE, n_errors) at flat weights ``w``, batch statistics (as DrMAD's
        evaluation): compiled on first use (only meta-loops evaluate)."""
        if self._f_eval is None:
            model = self.problem.model
            w, X, y = tt.vector("w", dtype=self._fx), model.input_var("X"), tt.lvector("y")
            logits, _ = model.forward(M.split(w, self.problem.layout), X, None)
            outs = [M.cross_entropy(logits, y), tt.neq(tt.argmax(logits, axis=1), y).sum()]
            self._f_eval = fncache.function([w, X, y], outs, name="exact_eval")
        return self._f_eval

    # -- host helpers -----------------------------------------------------------------------
    def _check_hypers(self, hypers):
        self.dh.check(hypers, self.problem.n_iters)

    def set_hypers(self, hypers: HyperParams) -> None:
        """Copy the L2 strengths and the schedule tables (quantised momenta) to the device."""
        self._check_hypers(hypers)
        self.dh.set(hypers, quantise=True)

    def grad(self, w, l2, X, y) -> np.ndarray:
        """g_t = grad_w L at the float weights ``w`` (float64 copy of the device's floatX)."""
        return self.fns.grad(w, l2, X, y)

    def objective_and_grad(self, w) -> tuple:
        """(f(w), grad f(w)) with f = sum_c (n_c / N) CE_c (``gpu_ver.drmad``'s objective)."""
        p, N = self.problem, len(self.problem.y_val)
        total, grad = 0.0, np.zeros(p.layout.size)
        for a, b in self.chunks:
            nll, g = self.fns.nll_and_grad(w, p.X_val[a:b], p.y_val[a:b])
            total, grad = total + nll * (b - a) / N, grad + g * ((b - a) / N)
        return total, grad

    # -- passes -----------------------------------------------------------------------------
    def forward(self, hypers: HyperParams, *, progress: bool = False) -> Trajectory:
        """Exact forward pass (Algorithm 1)."""
        p = self.problem
        self._check_hypers(hypers)
        W = ExactRep(p.w0(hypers), "weights", self.buffer)
        V = ExactRep(np.zeros(p.layout.size), "velocity", self.buffer)
        w0_fixed, keys, prints = W.c.copy(), fingerprint_keys(W.c.size), []
        l2 = hypers.per_param("l2")
        bar = progress_bar(p.n_iters, "exact forward", progress)
        for t in range(p.n_iters):
            prints.append(fingerprint(W, V, keys))
            s = schedule(hypers, t)
            X, y = p.batch(t)
            g = self.grad(W.val, l2, X, y)
            check_finite("training gradient", g, t)
            V.mul(s.n, t).sub((1.0 - s.gamma) * g, t)
            W.add(s.alpha * V.val, t)
            bar.update(1)
        bar.close()
        self._w_eval = W.val.copy()
        return Trajectory(W, V, w0_fixed, prints, keys)

    def reverse(self, hypers: HyperParams, traj: Trajectory, *, progress: bool = False) -> HypergradResult:
        """Exact reverse pass (Algorithm 2); consumes ``traj`` (its state is rewound to step 0)."""
        p, fx, a = self.problem, self._fx, self.adj
        self.set_hypers(hypers)
        W, V = traj.W, traj.V
        w_T = W.val
        bits = V.buffer.bits()
        objective, dw = self.objective_and_grad(w_T)
        check_finite("validation gradient", dw, p.n_iters)
        a.dw.set_value(dw.astype(fx))
        a.dv.set_value(np.zeros_like(a.dv.get_value(borrow=True)))
        self.dh.zero()
        bar = progress_bar(p.n_iters, "exact reverse", progress)
        hypers_l2 = hypers.per_param("l2")
        for t in reversed(range(p.n_iters)):
            s = schedule(hypers, t)
            X, y = p.batch(t)
            v_next = V.val
            W.sub(s.alpha * v_next, t)
            g, nll, chk = self.f_reverse(X, y, t, W.val.astype(fx), v_next.astype(fx))
            if not np.isfinite(chk):
                raise NonFiniteError("hypergradient (dw)", t, f"training loss at w_t {float(nll)}")
            if self.hvp == "rop":        # the forward pass's own function: the same g bit for bit
                g = self.grad(W.val, hypers_l2, X, y)
            V.add((1.0 - s.gamma) * np.asarray(g, np.float64), t).div(s.n, t)
            check_step(W, V, traj, t)
            bar.update(1)
        bar.close()
        err = check_recovered(traj)
        grads, dw0 = self._collect(hypers)
        info = {**reversal_info(err, bits, w_T.size, p.n_iters), "floatX": fx,
                "information_floor_bits": _floor(hypers, w_T.size, p.n_iters)}
        return HypergradResult(objective, grads, dw0, w_T, info)

    def _collect(self, hypers) -> tuple:
        dw0 = np.asarray(self.adj.dw.get_value(), np.float64)
        return self.dh.collect(hypers, dw0, self.problem.init_base()), dw0

    def hypergradient(self, hypers: HyperParams, *, progress: bool = False) -> HypergradResult:
        """Exact hypergradient of the meta-objective: forward then reverse."""
        t0 = time.perf_counter()
        traj = self.forward(hypers, progress=progress)
        t1 = time.perf_counter()
        res = self.reverse(hypers, traj, progress=progress)
        res.info.update({"forward_s": t1 - t0, "reverse_s": time.perf_counter() - t1})
        return res

    def evaluate(self, X, y, chunk=None) -> tuple:
        """(mean CE, error rate) at the weights w_T of the last forward pass over (X, y), in
        near-equal chunks with batch statistics per chunk (``gpu_ver.drmad.DrMAD.evaluate``)."""
        n = len(y)
        if n == 0:
            return float("nan"), float("nan")
        if self._w_eval is None:
            raise ConfigError("evaluate: no forward pass has run yet")
        w, total, errs = self._w_eval.astype(self._fx), 0.0, 0
        for a, b in val_chunks(n, chunk or self.problem.val_chunk):
            l, e = self.f_eval(w, np.asarray(X[a:b], self._fx), np.asarray(y[a:b], np.int64))
            total, errs = total + float(l) * (b - a), errs + int(e)
        return total / n, errs / n

    def validation(self, accumulate_grad: bool = False) -> tuple:
        """(f(w_T), error rate) on the validation split (``DrMAD.validation`` without the
        gradient, which the exact reverse pass takes itself)."""
        if accumulate_grad:
            raise ConfigError("the exact engine takes the validation gradient in its reverse pass")
        return self.evaluate(self.problem.X_val, self.problem.y_val)

    def train(self, hypers: HyperParams, *, quantise: bool = True) -> np.ndarray:
        """Plain float64 SGD with momentum (the same steps and gradient function, no exact
        storage); returns w_T."""
        p = self.problem
        w = p.w0(hypers)
        v = np.zeros_like(w)
        l2 = hypers.per_param("l2")
        for t in range(p.n_iters):
            s = schedule(hypers, t, quantise)
            X, y = p.batch(t)
            g = self.grad(w, l2, X, y)
            check_finite("training gradient", g, t)
            v = s.gamma * v - (1.0 - s.gamma) * g
            w = w + s.alpha * v
        return w

    def objective_after_training(self, hypers: HyperParams, quantise: bool = False) -> float:
        """f(w_T(hypers)) by plain training (unquantised momentum by default): what FD differentiates."""
        return self.objective_and_grad(self.train(hypers, quantise=quantise))[0]


# --------------------------------------------------------------------------- cpu_ver's API
def engine(problem: Problem, hypers: HyperParams, buffer: str = "vector", hvp: str = M.DEFAULT_HVP) -> Reversible:
    """The compiled engine for ``problem``, these hyperparameter shapes and this HVP method (kept on the problem)."""
    key = ("reversible", buffer, tuple(hypers.group(n).shape for n in GROUPS), hvp)
    if key not in problem._cache:
        problem._cache[key] = Reversible(problem, hypers, buffer=buffer, hvp=hvp)
    return problem._cache[key]


def forward(problem: Problem, hypers, *, buffer: str = "vector", progress: bool = False) -> Trajectory:
    """Exact forward pass (Algorithm 1)."""
    return engine(problem, hypers, buffer).forward(hypers, progress=progress)


def reverse(problem: Problem, hypers, traj: Trajectory, *, progress: bool = False) -> HypergradResult:
    """Exact reverse pass (Algorithm 2); consumes ``traj`` (its state is rewound to step 0)."""
    eng = next((e for k, e in problem._cache.items() if k[0] == "reversible"
                and k[2] == tuple(hypers.group(n).shape for n in GROUPS)), None) or engine(problem, hypers)
    return eng.reverse(hypers, traj, progress=progress)


def hypergradient(problem: Problem, hypers, *, buffer: str = "vector", hvp: str = M.DEFAULT_HVP,
                  progress: bool = False) -> HypergradResult:
    """Exact hypergradient of the meta-objective: forward then reverse."""
    return engine(problem, hypers, buffer, hvp).hypergradient(hypers, progress=progress)


def information_floor_bits(problem: Problem, hypers) -> float:
    """sum_t sum_i log2(d / n_{t,i}): the bits that multiplication by the momenta destroys."""
    return _floor(hypers, problem.layout.size, problem.n_iters)
