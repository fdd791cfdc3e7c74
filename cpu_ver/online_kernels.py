"""Compiled (numba) elementwise kernels for the online methods of ``cpu_ver.adaptive``.

A per-parameter method touches every parameter at every step; written as numpy
expressions its update is a dozen passes over arrays as large as the model plus
a scalar ``exp`` per parameter, which on an MLP with 1.8M parameters costs half
of a gradient. Here each update is one pass, and ``exp`` is evaluated by a
polynomial that the compiler vectorises.

``exp`` (Cody and Waite's reduction, Tang's ACM TOMS 15(2) 1989 scheme without
the table): x = k ln2 + r with k = round(x / ln2), |r| <= ln2 / 2, ln2 split in
a high part exact in 32 bits and a low part so that r is computed with an error
below 2^-60; e^r by its Taylor polynomial of degree 13 (truncation error
r^14/14! < 2^-60 for |r| <= 0.347) in Horner form; e^x = e^r 2^k1 2^k2 with
k1 = round(k/2), k2 = k - k1 built from exponent bits, so that results in the
subnormal range and up to the largest double are formed without overflow of
the scale. Measured against ``np.exp``: at most 1 ulp apart over [-745, 709]
(tests/test_online_kernels.py). Beyond: +inf above log(DBL_MAX), 0 below
log(smallest subnormal / 2), NaN stays NaN.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

_INV_LN2 = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01   # upper bits of ln 2: k * _LN2_HI is exact for |k| < 2^20
_LN2_LO = 1.90821492927058770002e-10
_SHIFTER = 6755399441055744.0           # 1.5 2^52
_SHIFTER_BITS = 0x4338000000000000      # its bits
_X_MAX = 709.782712893384               # log(DBL_MAX)
_X_MIN = -745.1332191019412             # log(2^-1075): below, e^x rounds to 0


@intrinsic
def _double_to_bits(typingctx, x):
    """Reinterpret a float64 as the int64 with the same bits (a register move)."""
    sig = types.int64(types.float64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return sig, codegen


@intrinsic
def _bits_to_double(typingctx, bits):
    """Reinterpret an int64 as the float64 with the same bits (a register move)."""
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return sig, codegen


@numba.njit(inline="always", nogil=True, fastmath={"contract"})
def vexp(x):
    """e^x to within 1 ulp, branch-free so that loops calling it vectorise."""
    xc = x if x > -746.0 else -746.0          # also maps NaN to a finite value (fixed below)
    xc = xc if xc < 710.0 else 710.0
    t = xc * _INV_LN2 + _SHIFTER              # round to nearest: k sits in t's low bits
    kf = t - _SHIFTER
    r = (xc - kf * _LN2_HI) - kf * _LN2_LO
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    t1 = kf * 0.5 + _SHIFTER                 # k = k1 + k2, both halves in the normal range
    k1f = t1 - _SHIFTER
    t2 = (kf - k1f) + _SHIFTER
    s1 = _bits_to_double((_double_to_bits(t1) - _SHIFTER_BITS + 1023) << 52)
    s2 = _bits_to_double((_double_to_bits(t2) - _SHIFTER_BITS + 1023) << 52)
    y = p * s1 * s2
    y = y if x <= _X_MAX else np.inf
    y = y if x >= _X_MIN else 0.0
    return y if x == x else x


@numba.njit(cache=True, nogil=True, fastmath={"contract"})
def exp_array(x, out):
    """out <- e^x elementwise (float64 arrays of one shape, C order); returns out."""
    xf = x.reshape(-1)
    of = out.reshape(-1)
    for i in range(xf.shape[0]):
        of[i] = vexp(xf[i])
    return out


_BLOCK = 2048   # elements per block: the block's e^x buffer stays in L1

# The helpers below are separate compiled functions, not inlined into the kernels at
# numba's level: inlined, the two IDBD kernels took 38 s and 41 s to compile (LLVM on
# four copies of the vectorised exp loop); separate, 6 s and 2 s, same speed per step.


@numba.njit(nogil=True, fastmath={"contract"})
def _exp_block(src, dst):
    for j in range(src.shape[0]):
        dst[j] = vexp(src[j])


@numba.njit(nogil=True, fastmath={"contract"})
def _idbd_block(g, h, b, w, d, theta, decay, clip, w_new, b_new, h_new, lo, hi, has_d):
    """Elements [lo, hi): the cheap arithmetic in plain loops, e^x in its own
    loop over a small buffer and one output array per loop (a loop that reads and
    writes more arrays is not vectorised: the compiler's aliasing checks give up). Returns the number
    of non-finite g h."""
    bad = 0
    for i in range(lo, hi):
        x = min(max(g[i] * h[i], -clip), clip)
        bad += not (x - x == 0.0)
        b_new[i] = b[i] - theta * x
    a = np.empty(hi - lo)
    _exp_block(b_new[lo:hi], a)
    for i in range(lo, hi):
        w_new[i] = w[i] - a[i - lo] * g[i]
    if has_d:
        for i in range(lo, hi):
            h_new[i] = decay * h[i] * max(0.0, 1.0 - a[i - lo] * d[i]) - a[i - lo] * g[i]
    else:
        for i in range(lo, hi):
            h_new[i] = decay * h[i] - a[i - lo] * g[i]
    return bad


@numba.njit(nogil=True)
def _idbd_blocks(g, h, b, w, d, theta, decay, clip, w_new, b_new, h_new, has_d):
    n = g.shape[0]
    bad = 0
    for lo in range(0, n, _BLOCK):
        bad += _idbd_block(g, h, b, w, d, theta, decay, clip, w_new, b_new, h_new, lo, min(n, lo + _BLOCK), has_d)
    return bad


@numba.njit(cache=True, nogil=True, fastmath={"contract"})
def idbd_kernel(g, h, b, w, theta, decay, clip, w_new, b_new, h_new):
    """One IDBD step (``cpu_ver.adaptive.idbd``, diagonal curvature, d = 0):

        hg = clip(g h);  b' = b - theta hg;  a = e^{b'}
        w' = w - a g;    h' = decay h - a g

    in one pass over the arrays, into the caller's ``w_new, b_new, h_new``
    (allocated by numpy, whose allocator reuses freed pages; numba's would
    fault in fresh pages at every step, which costs more than the arithmetic).
    ``clip``: +inf for no clipping. Returns the number of non-finite hg.
    One thread: the update is memory-bound, and a second thread competes with
    the BLAS threads that are still spinning after the gradient (measured: no
    gain per training step on two cores).
    """
    return _idbd_blocks(g, h, b, w, g, theta, decay, clip, w_new, b_new, h_new, False)


@numba.njit(cache=True, nogil=True, fastmath={"contract"})
def idbd_diag_kernel(g, h, b, w, d, theta, decay, clip, w_new, b_new, h_new):
    """``idbd_kernel`` with a known Hessian diagonal d (Sutton's linear unit: d = x^2):
    h' = decay h max(0, 1 - a d) - a g."""
    return _idbd_blocks(g, h, b, w, d, theta, decay, clip, w_new, b_new, h_new, True)
