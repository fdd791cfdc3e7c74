"""Compiled (numba) elementwise kernels for the online methods of ``cpu_ver.online``.

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
the scale. Within 1 ulp of the correctly rounded e^x over [-745, 709]
(tests/test_online_kernels.py). Beyond: +inf above log(DBL_MAX), 0 below
log(smallest subnormal / 2), NaN stays NaN.

No fast-math flags, not even ``contract``: every multiply-add that is meant to be
fused is an explicit ``_fma`` (one rounding, on any path), and everything else is
IEEE arithmetic that LLVM may only rewrite into bit-identical code. With
``contract`` the compiler was free to fuse or not, and its choice differed between
two compilations of the same loop: a cached kernel that calls another jitted
function carries its own copy of it, optimised again inside the kernel's module,
where the product a g came out shared by w' and h' and w - a g was rounded twice;
a fresh process runs the callee's own first compilation instead (the JIT binds the
call to the symbol already loaded), a process that loads the kernel from numba's
disk cache runs that copy. So the same seeded run gave other last bits with a warm
cache (tests/test_online_kernels.py runs both and compares the bytes).
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


@intrinsic
def _fma(typingctx, a, b, c):
    """a b + c with one rounding (``llvm.fma``; a single instruction where the CPU has FMA,
    which numba's cache key includes). Explicit rather than left to ``contract``, so that
    whether a multiply-add is fused does not depend on how LLVM optimised the loop."""
    sig = types.float64(types.float64, types.float64, types.float64)

    def codegen(context, builder, signature, args):
        f64 = ir.DoubleType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f64], ir.FunctionType(f64, [f64, f64, f64]))
        return builder.call(fn, args)

    return sig, codegen


@numba.njit(inline="always", nogil=True)
def vexp(x):
    """e^x to within 1 ulp, branch-free so that loops calling it vectorise."""
    xc = x if x > -746.0 else -746.0          # also maps NaN to a finite value (fixed below)
    xc = xc if xc < 710.0 else 710.0
    t = _fma(xc, _INV_LN2, _SHIFTER)          # round to nearest: k sits in t's low bits
    kf = t - _SHIFTER
    r = _fma(-kf, _LN2_LO, _fma(-kf, _LN2_HI, xc))   # the inner product is exact
    p = 1.0 / 6227020800.0
    p = _fma(p, r, 1.0 / 479001600.0)
    p = _fma(p, r, 1.0 / 39916800.0)
    p = _fma(p, r, 1.0 / 3628800.0)
    p = _fma(p, r, 1.0 / 362880.0)
    p = _fma(p, r, 1.0 / 40320.0)
    p = _fma(p, r, 1.0 / 5040.0)
    p = _fma(p, r, 1.0 / 720.0)
    p = _fma(p, r, 1.0 / 120.0)
    p = _fma(p, r, 1.0 / 24.0)
    p = _fma(p, r, 1.0 / 6.0)
    p = _fma(p, r, 0.5)
    p = _fma(p, r, 1.0)
    p = _fma(p, r, 1.0)
    t1 = kf * 0.5 + _SHIFTER                 # k = k1 + k2, both halves in the normal range
    k1f = t1 - _SHIFTER
    t2 = (kf - k1f) + _SHIFTER
    s1 = _bits_to_double((_double_to_bits(t1) - _SHIFTER_BITS + 1023) << 52)
    s2 = _bits_to_double((_double_to_bits(t2) - _SHIFTER_BITS + 1023) << 52)
    y = p * s1 * s2
    y = y if x <= _X_MAX else np.inf
    y = y if x >= _X_MIN else 0.0
    return y if x == x else x


@numba.njit(cache=True, nogil=True)
def exp_array(x, out):
    """out <- e^x elementwise (float64 arrays of one shape, C order); returns out."""
    xf = x.reshape(-1)
    of = out.reshape(-1)
    for i in range(xf.shape[0]):
        of[i] = vexp(xf[i])
    return out


# LLVM's loop vectoriser proves that a loop's arrays do not overlap by run-time
# checks, and gives up when more than 8 are needed (its default): an update that
# reads four arrays and writes three needs 15 (each written array against every
# other array), so the one-pass loops below would run one element at a time.
# Raised here, once per process, before any kernel of this module is compiled. It
# changes which loops LLVM vectorises (behind checks that fall back to the scalar
# loop when arrays overlap), never what a loop computes.
_RUNTIME_CHECKS = 32


def _allow_runtime_checks(n):
    """Process-wide LLVM option ``-runtime-memory-check-threshold=n`` (numba's LLVM)."""
    import llvmlite.binding as llvm

    llvm.set_option("", f"-runtime-memory-check-threshold={n}")


_allow_runtime_checks(_RUNTIME_CHECKS)


def _make_idbd_pass(with_d):
    """The kernels' loop over flat arrays: one vectorised pass, every array streamed
    once and e^x computed while the next elements load; returns the number of
    non-finite g h. ``with_d`` (a constant of the compiled loop) adds the trace's
    curvature factor max(0, 1 - a d).

    The cached kernels below call this loop, so a process runs either this function's
    own compilation (the kernel compiled here) or the kernel's copy of it (the kernel
    loaded from the cache); the two are optimised separately and give the same bits
    only because no fast-math flag leaves the rounding to the optimiser."""

    @numba.njit(nogil=True)
    def idbd_pass(g, h, b, w, d, theta, decay, clip, w_new, b_new, h_new):
        bad = 0
        for i in range(g.shape[0]):
            x = min(max(g[i] * h[i], -clip), clip)
            bad += not (x - x == 0.0)
            bi = b[i] - theta * x
            b_new[i] = bi
            a = vexp(bi)
            w_new[i] = _fma(-a, g[i], w[i])
            hv = decay * h[i]
            if with_d:
                hv *= max(0.0, _fma(-a, d[i], 1.0))
            h_new[i] = _fma(-a, g[i], hv)
        return bad

    return idbd_pass


_idbd_pass = _make_idbd_pass(False)
_idbd_diag_pass = _make_idbd_pass(True)


@numba.njit(cache=True, nogil=True)
def idbd_kernel(g, h, b, w, theta, decay, clip, w_new, b_new, h_new):
    """One IDBD step (``cpu_ver.online.rules.idbd``, diagonal curvature, d = 0):

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
    return _idbd_pass(g, h, b, w, g, theta, decay, clip, w_new, b_new, h_new)


@numba.njit(cache=True, nogil=True)
def idbd_diag_kernel(g, h, b, w, d, theta, decay, clip, w_new, b_new, h_new):
    """``idbd_kernel`` with a known Hessian diagonal d (Sutton's linear unit: d = x^2):
    h' = decay h max(0, 1 - a d) - a g."""
    return _idbd_diag_pass(g, h, b, w, d, theta, decay, clip, w_new, b_new, h_new)
