"""The compiled kernels of cpu_ver/online_kernels.py against numpy and exact references."""
from decimal import Context, Decimal

import numpy as np
import pytest

from cpu_ver import online as ad
from cpu_ver import online_kernels as K
from shared.errors import NonFiniteError
from shared.layout import ParamLayout


def _correctly_rounded_exp(x):
    """e^x rounded to the nearest double: exact decimal arithmetic (30 digits, far more than
    the 17 a double needs), then Python's correctly rounded decimal-to-float conversion
    (subnormals included). A reference that does not depend on any libm or CPU."""
    ctx = Context(prec=30, Emin=-999_999, Emax=999_999)
    return np.array([float(Decimal(v).exp(ctx)) for v in x.tolist()])


def test_exp_within_one_ulp_of_the_correctly_rounded_result():
    """vexp's error is below 1 ulp of e^x (module docstring: reduction and truncation below
    2^-60, Horner's rounding below 1 ulp; the scaling by 2^k is exact, or one rounding to
    the subnormal grid), so it is at most 1 ulp from e^x rounded to nearest: both are
    doubles within 1.5 ulp of each other. Not compared with np.exp, whose last bit
    depends on the CPU numpy dispatches to (its AVX-512 loop is up to 4 ulp off)."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-745.0, 709.7, 6_000), rng.uniform(-2.0, 2.0, 3_000),
                        rng.uniform(-745.13, -708.0, 2_000)])           # subnormal results
    ref = _correctly_rounded_exp(x)
    got = K.exp_array(x, np.empty_like(x))
    ulps = np.abs(got - ref) / np.spacing(ref)
    assert np.max(ulps) <= 1.0


def test_exp_special_values():
    """NaN stays NaN, overflow gives +inf and underflow 0 exactly, as the correctly
    rounded e^x does; the finite results next to the thresholds within 1 ulp of it."""
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 709.78, 709.79, 710.5, 1e4,
                  -745.13, -745.14, -746.0, -1e4, 1e-300, -1e-300])
    ref = _correctly_rounded_exp(x)
    got = K.exp_array(x, np.empty_like(x))
    exact = ~np.isfinite(ref) | (ref == 0.0) | (ref == 1.0)
    assert np.array_equal(got[exact], ref[exact], equal_nan=True), (got, ref)
    assert np.all(np.abs(got - ref)[~exact] <= np.spacing(ref[~exact])), (got, ref)


def _reference(g, h, b, w, theta, decay, clip, d=None):
    hg = np.clip(g * h, -clip, clip)
    b_new = b - theta * hg
    a = np.exp(b_new)
    hv = h if d is None else h * np.maximum(0.0, 1.0 - a * d)
    return w - a * g, b_new, decay * hv - a * g


@pytest.mark.parametrize("clip,decay,with_d", [(np.inf, 1.0, False), (1e-4, 0.9, False), (np.inf, 1.0, True),
                                               (1e-4, 0.0, True)])
def test_idbd_kernel_matches_numpy(clip, decay, with_d):
    rng = np.random.default_rng(1)
    n = 10_257                                         # a ragged end after the vector loop
    g, h, w = rng.standard_normal(n), rng.standard_normal(n) * 1e-2, rng.standard_normal(n)
    b = rng.uniform(-8.0, 0.5, n)
    d = rng.random(n) if with_d else None
    out = [np.empty(n) for _ in range(3)]
    if with_d:
        bad = K.idbd_diag_kernel(g, h, b, w, d, 0.3, decay, clip, *out)
    else:
        bad = K.idbd_kernel(g, h, b, w, 0.3, decay, clip, *out)
    assert bad == 0
    for got, ref in zip(out, _reference(g, h, b, w, 0.3, decay, clip, d)):
        assert np.linalg.norm(got - ref) <= 1e-14 * np.linalg.norm(ref)


def test_idbd_kernel_counts_nonfinite_and_update_names_the_step():
    n = 100
    g = np.ones(n)
    g[[3, 70]] = [np.nan, np.inf]
    out = [np.empty(n) for _ in range(3)]
    assert K.idbd_kernel(g, np.ones(n), np.zeros(n), np.zeros(n), 0.1, 1.0, np.inf, *out) == 2
    m = ad.make_method("idbd", ParamLayout(("w",), ((n,),)), lr=0.1, theta=0.1)
    st = m.init(np.zeros(n))
    w, st = m.update(ad.GradInfo(np.ones(n), None, None), st, np.zeros(n))   # step 0: h = 0, fine
    with pytest.raises(NonFiniteError, match="step 1"):
        m.update(ad.GradInfo(g, None, None), st, w)


def test_idbd_pass_is_vectorised():
    """The one-pass loop is only fast when LLVM vectorises it, which needs the raised
    run-time check threshold (``online_kernels._allow_runtime_checks``). Checked in the
    optimised LLVM IR, which names no instruction set: the loop vectoriser's
    ``vector.body`` with arithmetic on ``<N x double>`` (N = 2 for SSE2, 4 for AVX2, 8
    for AVX-512). ``NUMBA_LOOP_VECTORIZE=0`` makes this fail."""
    import re

    a = [np.ones(64) for _ in range(8)]
    K._idbd_pass(a[0], a[1], a[2], a[3], a[0], 0.1, 1.0, np.inf, a[4], a[5], a[6])
    llvm_ir = K._idbd_pass.inspect_llvm(K._idbd_pass.signatures[0])
    widths = {int(n) for n in re.findall(r"\bf(?:mul|add|sub)(?: \w+)* <(\d+) x double>", llvm_ir)}
    assert "vector.body" in llvm_ir and widths and min(widths) >= 2, "IDBD's pass was not vectorised"


_CACHE_CHILD = """
import sys
import numpy as np
from cpu_ver import online_kernels as K

rng = np.random.default_rng(7)
n = 10_257                                          # a ragged end after the vector loop
g, h, w = rng.standard_normal(n), rng.standard_normal(n) * 1e-2, rng.standard_normal(n)
b, d, x = rng.uniform(-8.0, 0.5, n), rng.random(n), rng.uniform(-745.0, 709.0, n)
outs = [K.exp_array(x, np.empty(n))]
for clip, decay in ((np.inf, 1.0), (1e-4, 0.9)):
    outs += [np.empty(n) for _ in range(6)]
    outs.append(np.array([K.idbd_kernel(g, h, b, w, 0.3, decay, clip, *outs[-6:-3]),
                          K.idbd_diag_kernel(g, h, b, w, d, 0.3, decay, clip, *outs[-3:])], float))
kernels = (K.exp_array, K.idbd_kernel, K.idbd_diag_kernel)
print(sum(sum(k.stats.cache_hits.values()) for k in kernels),
      sum(sum(k.stats.cache_misses.values()) for k in kernels), file=sys.stderr)
sys.stdout.buffer.write(b"".join(o.tobytes() for o in outs))
"""


def test_kernels_give_the_same_bits_freshly_compiled_and_loaded_from_numbas_cache(tmp_path):
    """The same inputs give the same output bytes in a process that compiles the kernels
    (empty ``NUMBA_CACHE_DIR``) and in one that loads them from that cache (the numba
    cache statistics say which happened). Failed while the module left multiply-adds to
    ``fastmath={"contract"}``: the IDBD kernels call the loop of ``_make_idbd_pass``; a
    fresh process ran that loop's own compilation, a cached one the copy linked into the
    kernel and optimised again there, which fused w - a g differently (last bits of w')."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("NUMBA_DISABLE_JIT", None)

    def child():
        r = subprocess.run([sys.executable, "-c", _CACHE_CHILD], cwd=root, env=env, capture_output=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr.decode()
        hits, misses = (int(v) for v in r.stderr.decode().split()[-2:])
        return r.stdout, hits, misses

    fresh, hits, misses = child()
    assert hits == 0 and misses == 3, "the first child did not compile every kernel"
    cached, hits, misses = child()
    assert hits == 3 and misses == 0, "the second child did not load every kernel from the cache"
    assert len(fresh) == len(cached) == 8 * 10_257 * 13 + 8 * 4
    differ = np.flatnonzero(np.frombuffer(fresh, np.uint64) != np.frombuffer(cached, np.uint64))
    assert differ.size == 0, f"{differ.size} doubles differ between a fresh and a cached kernel, first {differ[:5]}"
