"""Compiled (numba) kernels for the exact-arithmetic storage of ``shared.exact_rep``.

One pass over the weights per operation, the same arithmetic as the numpy
``VectorBuffer`` (which stays as the readable version and is tested to give
bit-identical states):

* ``mul_kernel``: c <- (c div d) n + pop_n, with c mod d pushed (rANS, see
  ``exact_rep``); spills 16-bit words while the head is >= 2^47.
* ``div_kernel``: the exact inverse.
* ``add_kernel``: c <- c + sign * trunc(a 2^52) with the range checks of
  ``to_fixed`` and of the sum; returns the first offending index or -1.

The numpy version takes about 50 passes over the arrays per momentum step;
these take one each, which is what keeps the buffer arithmetic a small fraction
of a gradient evaluation.
"""
from __future__ import annotations

import math

import numba
import numpy as np

_M = np.uint64(2 ** 31)
_MF = float(2 ** 31)
_SLOT = np.uint64(2 ** 31 - 1)
_HI = np.uint64(2 ** 47)
_LOW16 = np.uint64(0xFFFF)
_FMASK = np.uint64(0x7FFF)
_S15 = np.uint64(15)
_S16 = np.uint64(16)
_S31 = np.uint64(31)
_ONE = np.uint64(1)
_SCALE = float(2 ** 52)
_CLIM = 2 ** 62
_CLIMF = float(2 ** 62)
_QLIM = 2 ** 46


@numba.njit(cache=True, nogil=True)
def _start(s, n):
    # ceil(s 2^31 / n) in float64: exact (see exact_rep._digit_range)
    return np.uint64(math.ceil((float(s) * _MF) / float(n)))


@numba.njit(cache=True, nogil=True)
def mul_kernel(c, head, depth, words, n_arr):
    """In place: c <- c n / d exactly invertibly. Returns the largest stack depth."""
    size = c.shape[0]
    uniform = n_arr.shape[0] == 1
    maxd = 0
    for i in range(size):
        n = n_arr[0] if uniform else n_arr[i]
        nu = np.uint64(n)
        ci = c[i]
        r1 = np.uint64(ci & 0xFFFF)
        q = ci >> 16
        x = head[i]
        y = ((x >> _S15) << _S31) | (x & _FMASK) | (r1 << _S15)
        slot = y & _SLOT
        s = (slot * nu) >> _S31
        st = _start(s, n)
        f = _start(s + _ONE, n) - st
        z = f * (y >> _S31) + slot - st
        d = depth[i]
        while z >= _HI:
            words[d, i] = np.uint16(z & _LOW16)
            d += 1
            z = z >> _S16
        depth[i] = d
        if d > maxd:
            maxd = d
        head[i] = z
        c[i] = q * n + np.int64(s)
    return maxd


@numba.njit(cache=True, nogil=True)
def div_kernel(c, head, depth, words, n_arr):
    """In place: the inverse of ``mul_kernel``. Returns -1, the index of a buffer underflow,
    or -(index + 2) where the quotient leaves the range (entries before it are updated)."""
    size = c.shape[0]
    uniform = n_arr.shape[0] == 1
    for i in range(size):
        n = n_arr[0] if uniform else n_arr[i]
        ci = c[i]
        q = ci // n                      # floor division, as numpy
        if q >= _QLIM or q < -_QLIM:
            return -(i + 2)              # the result would leave the fixed-point range
        r2 = np.uint64(ci - q * n)
        st = _start(r2, n)
        f = _start(r2 + _ONE, n) - st
        bound = f << _S16
        x = head[i]
        d = depth[i]
        while x < bound:
            d -= 1
            if d < 0:
                return i
            x = (x << _S16) | np.uint64(words[d, i])
        depth[i] = d
        qq = x // f
        y = (qq << _S31) + (x - qq * f) + st
        head[i] = ((y >> _S31) << _S15) | (y & _FMASK)
        c[i] = (q << 16) | np.int64((y & _SLOT) >> _S15)
    return -1


@numba.njit(cache=True, nogil=True)
def add_kernel(c, a, sign):
    """In place: c <- c + sign * trunc(a 2^52). Returns -1, or the index of the first entry
    whose increment is out of range / not finite (nothing changed from there on), or
    -(index + 2) when the sum left the range."""
    size = c.shape[0]
    for i in range(size):
        t = a[i] * _SCALE
        if not abs(t) < _CLIMF:
            return i
        v = c[i] + sign * np.int64(t)
        if v >= _CLIM or v <= -_CLIM:
            return -(i + 2)
        c[i] = v
    return -1
