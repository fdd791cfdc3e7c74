"""DrMAD: approximate reverse-mode hypergradients along an interpolated trajectory.

Fu, Luo, Xu, Chua & Lin, "DrMAD: Distilling Reverse-Mode Automatic
Differentiation for Optimizing Hyperparameters of Deep Neural Networks",
IJCAI 2016 (docs/ALGORITHMS.md s.2, eqs. 21-25).

The forward pass is plain float SGD with momentum that keeps only K+1
snapshots ``w_{s_0}, ..., w_{s_K}`` at ``s_k = round(k T / K)`` (K = 1: the
initial and final weights, DrMAD proper; memory independent of T). The reverse
pass runs the exact recursion of ``reversible`` with the unknown ``w_t``
replaced by a point on the segment that contains t::

    w(t) = (1 - beta_t) w_{s_k} + beta_t w_{s_{k+1}},   s_k <= t <= s_{k+1}

Options (the "candidate completions" of the published code, made explicit):

* ``grid='t/T'``: beta_t = (t - s_k) / (s_{k+1} - s_k), the batch of step t
  paired with point t (the original paired point i with batch i over only the
  first T/10 batches);
  ``grid='cumlr'``: beta_t proportional, per parameter, to the cumulative
  learning rate sum_{s_k <= u < t} alpha_u (the path traversed at the speed of
  the step sizes).
* ``velocity='reconstruct'``: v_{t+1} ~ (w(t+1) - w(t)) / alpha_t, which also
  gives learning-rate and momentum hypergradients (v_0 = 0: the original had a
  wrap-around bug here); ``velocity='ignore'``: only L2 and initial-scale
  hypergradients (the dalpha and dgamma terms are dropped and those groups
  are absent from the result).

With K = T and velocity reconstructed, every w(t) is a stored point and every
velocity is recovered to rounding, so the result equals the exact
hypergradient to rounding (tested).
"""
from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from cpu_ver import sgd
from cpu_ver.problem import Problem, schedule
from cpu_ver.reversible import Adjoint, HypergradResult, adjoint_step, finish
from shared.errors import ConfigError

GRIDS = ("t/T", "cumlr")
VELOCITIES = ("reconstruct", "ignore")


def checkpoint_steps(T: int, K: int) -> np.ndarray:
    """s_k = round(k T / K), k = 0..K (K clipped to T)."""
    if isinstance(K, bool) or not isinstance(K, (int, np.integer)) or K < 1:
        raise ConfigError(f"DrMAD needs a whole number of segments K >= 1, got K={K!r}")
    K = min(int(K), T)
    return np.unique(np.round(np.arange(K + 1) * T / K).astype(int))


class Path:
    """The piecewise-linear approximation w(t) through the stored snapshots."""

    def __init__(self, problem: Problem, hypers, snaps: dict, steps: np.ndarray, grid: str):
        self.snaps, self.steps, self.grid = snaps, steps, grid
        if grid == "cumlr":
            # cum[t] = sum_{u < t} alpha_u, per parameter; only kept at the checkpoints plus a
            # running value, so memory stays O(K * size).
            self.hypers = hypers
            self.cum_at = {}
            acc = np.zeros(problem.model.layout.size)
            want = set(int(s) for s in steps)
            for t in range(problem.n_iters + 1):
                if t in want:
                    self.cum_at[t] = acc.copy()
                if t < problem.n_iters:
                    acc = acc + schedule(hypers, t).alpha
            self._cum_t, self._cum = problem.n_iters, acc

    def _segment(self, t: int):
        k = int(np.searchsorted(self.steps, t, side="right")) - 1
        k = min(max(k, 0), len(self.steps) - 2)
        return int(self.steps[k]), int(self.steps[k + 1])

    def _cumlr(self, t: int) -> np.ndarray:
        # walked downwards in the reverse pass: subtract alpha_u for u = t .. cum_t - 1
        while self._cum_t > t:
            self._cum_t -= 1
            self._cum = self._cum - schedule(self.hypers, self._cum_t).alpha
        while self._cum_t < t:
            self._cum = self._cum + schedule(self.hypers, self._cum_t).alpha
            self._cum_t += 1
        return self._cum

    def __call__(self, t: int) -> np.ndarray:
        a, b = self._segment(t)
        if t == a:
            return self.snaps[a]
        if t == b:
            return self.snaps[b]
        if self.grid == "t/T":
            beta = (t - a) / (b - a)
        else:
            ca, cb = self.cum_at[a], self.cum_at[b]
            beta = (self._cumlr(t) - ca) / (cb - ca)
        return (1.0 - beta) * self.snaps[a] + beta * self.snaps[b]


def hypergradient(problem: Problem, hypers, *, K: int = 1, grid: str = "t/T",
                  velocity: str = "reconstruct", progress: bool = False) -> HypergradResult:
    """DrMAD hypergradient of the meta-objective with K checkpoint segments."""
    if grid not in GRIDS:
        raise ConfigError(f"DrMAD grid must be one of {GRIDS}, got {grid!r}")
    if velocity not in VELOCITIES:
        raise ConfigError(f"DrMAD velocity must be one of {VELOCITIES}, got {velocity!r}")
    T = problem.n_iters
    steps = checkpoint_steps(T, K)
    w_T, _, snaps = sgd.train(problem, hypers, snapshots=steps, progress=progress)
    path = Path(problem, hypers, snaps, steps, grid)
    model = problem.model
    adj = Adjoint(problem.objective_grad(w_T), np.zeros_like(w_T), hypers.zero_grads())
    w_next = w_T
    w_t = path(T - 1) if T > 1 else snaps[0]
    for t in tqdm(reversed(range(T)), total=T, desc="drmad reverse", disable=not progress, leave=False):
        s = schedule(hypers, t)
        X, y = problem.batch(t)
        w_prev = path(t - 1) if t >= 1 else None
        if velocity == "reconstruct":
            v_next = (w_next - w_t) / s.alpha
            if t >= 1:
                alpha_prev = schedule(hypers, t - 1).alpha
                v_t = (w_t - w_prev) / alpha_prev
            else:
                v_t = np.zeros_like(w_t)
            recover_v = lambda g, v_t=v_t: v_t  # noqa: E731
        else:
            v_next, recover_v = None, (lambda g: None)
        adjoint_step(model, hypers, t, s, X, y, w_t, v_next, recover_v, adj)
        w_next, w_t = w_t, w_prev
    grads = finish(problem, hypers, adj)
    if velocity == "ignore":
        grads = {k: v for k, v in grads.items() if k not in ("lr", "momentum")}
    info = {"K": int(len(steps) - 1), "grid": grid, "velocity": velocity,
            "stored_vectors": int(len(snaps))}
    return HypergradResult(problem.objective(w_T), grads, adj.dw, w_T, info)
