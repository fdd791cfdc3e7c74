"""The online methods cross-checked between the backends: gpu_ver's one-step
hypergradients against cpu_ver's ``reference_hypergradients`` on the same float64
problem (the only module of ``gpu_ver.online`` that imports cpu_ver).
"""
from __future__ import annotations

import numpy as np

from gpu_ver.online.check import check_float64, reference_hypergradients


def rel_difference(a, b) -> float:
    """max|a - b| / max|b| (inf when the shapes differ): one part of the cross-check."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def crosscheck_adaptive(seed=0) -> dict:
    """``method -> max relative difference`` between this backend's one-step hypergradients and
    cpu_ver's ``reference_hypergradients(seed)`` on the same float64 problem: per part,
    max|gpu - cpu| / max|cpu| (so a near-zero entry does not blow up), maximised over parts.
    Both backends build the problem from ``shared.online``."""
    check_float64()
    from cpu_ver import online as cad  # noqa: PLC0415 (cpu_ver only here)

    ref = cad.reference_hypergradients(seed)
    mine = reference_hypergradients(seed)
    out = {}
    for name, parts in ref.items():
        if name not in mine:
            continue
        if set(parts) != set(mine[name]):
            out[name] = float("inf")
            continue
        out[name] = max(rel_difference(mine[name][k], parts[k]) for k in parts)
    return out

