"""Backend-neutral parts of exact reversible learning (docs/ALGORITHMS.md s.1).

Both ``cpu_ver/reversible.py`` and ``gpu_ver/reversible.py`` keep the weights and
velocities in ``shared.exact_rep.ExactRep`` fixed point and check their reversal
the same way:

* per step, a fingerprint of the exact state ``(W.c, V.c)``: two wrapping int64
  sums weighted by fixed random odd keys, so that a change in any entry changes
  them (equal and opposite changes do not cancel); the reverse pass compares it
  with the forward pass's at the same step and ``ReversalError`` names the first
  step (counting down) where they differ;
* at the end, ``w0`` recovered bit for bit, the velocity back to zero and the
  information buffer empty (``check_recovered``).

``information_floor_bits`` is the floor of docs/ALGORITHMS.md eq. 19: the bits
that multiplication by the momenta destroys, sum_t sum_i log2(d / n_{t,i}).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.errors import ReversalError
from shared.exact_rep import D, ExactRep
from shared.schedule import schedule


def fingerprint(W: ExactRep, V: ExactRep, keys: np.ndarray) -> tuple:
    """Two wrapping int64 sums of the state weighted by ``keys``."""
    return (int(np.dot(W.c, keys)), int(np.dot(V.c, keys)))


def fingerprint_keys(size: int) -> np.ndarray:
    """Fixed random odd int64 keys (the same on every run and backend)."""
    return np.random.default_rng(12345).integers(1, 2 ** 62, size, dtype=np.int64) | 1


@dataclass
class Trajectory:
    """The end of an exact forward pass: w_T, v_T (with the buffer) and per-step fingerprints."""
    W: ExactRep
    V: ExactRep
    w0_fixed: np.ndarray
    fingerprints: list
    keys: np.ndarray


@dataclass
class HypergradResult:
    objective: float
    grads: dict                # group name -> gradient wrt the constrained values (group's shape)
    grad_w0: np.ndarray
    w_final: np.ndarray
    info: dict


def check_step(W: ExactRep, V: ExactRep, traj: Trajectory, t: int) -> None:
    """ReversalError naming step ``t`` when the state differs from the forward pass's there."""
    if fingerprint(W, V, traj.keys) != traj.fingerprints[t]:
        raise ReversalError(f"exact reversal diverged from the forward pass at step {t} "
                            "(gradients not bit-reproducible?)")


def check_recovered(traj: Trajectory) -> float:
    """After the reverse pass: w0 bit for bit, v0 = 0, buffer empty; else ReversalError.
    Returns the (zero) maximum error in units of 2^-52."""
    W, V = traj.W, traj.V
    err = float(np.max(np.abs(W.c - traj.w0_fixed))) if W.c.size else 0.0
    if err != 0.0 or np.any(V.c != 0) or not V.buffer.is_empty():
        raise ReversalError(f"exact reversal did not recover w0 bit for bit (max |error| {err} units "
                            f"of 2^-52, velocity zero: {not np.any(V.c)}, buffer empty: {V.buffer.is_empty()})")
    return err


def reversal_info(err: float, bits: float, size: int, n_iters: int) -> dict:
    return {"reversal_max_abs_error": err, "buffer_bits": bits,
            "buffer_bits_per_weight_step": bits / (size * n_iters)}


def information_floor_bits(hypers, size: int, n_iters: int) -> float:
    """sum_t sum_i log2(d / n_{t,i}): the bits that multiplication by the momenta destroys."""
    total = 0.0
    for t in range(n_iters):
        n = schedule(hypers, t).n
        total += float(np.sum(np.log2(float(D) / np.broadcast_to(n, (size,)))))
    return total
