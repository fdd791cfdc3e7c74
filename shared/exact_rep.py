"""Exact-arithmetic storage for reversible SGD with momentum.

Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter Optimization
through Reversible Learning", ICML 2015, section 2.3 and appendix.

Weights and velocities are held in fixed point, ``c = trunc(x * 2^52)`` as
int64. Adding a float ``a`` adds ``trunc(a * 2^52)`` and is undone exactly by
subtracting the same float. Multiplying by a momentum ``gamma ~ n / d`` with
``d = 2^16`` and ``n = floor(gamma d) + 1`` destroys ``log2(d / n)`` bits per
weight, which are pushed into an information buffer and popped back when the
multiplication is undone:

    multiply by n/d:  push(c mod d, radix d); c = c div d; c = c n; c += pop(radix n)
    divide by n/d:    push(c mod n, radix n); c = c div n; c = c d; c += pop(radix d)

(floor division and modulo, so negative numbers work). The buffer is a stack of
mixed-radix digits per weight, ``push(r, M): B = B M + r``,
``pop(M): r = B mod M, B = B div M``.

Two buffers implement that stack:

* ``IntBuffer``: one unbounded Python integer per weight (the test oracle; the
  original implementation's object arrays). Popping an empty buffer gives 0.
* ``VectorBuffer``: the production buffer, vectorised over weights, a
  streaming range-variant ANS coder (Duda 2013; ``rans64`` layout: a 64-bit
  head ``x`` per weight kept in ``[2^31, 2^63)`` and a stack of 32-bit words;
  Townsend et al. 2019 use the same coder for bits-back). Symbols are coded
  with a probability precision of ``M = 2^31``: the radix-d digit ``r1`` with
  frequency ``2^31 / d`` (exactly uniform), and the radix-n digit ``r2`` with
  frequency ``ceil((s+1) M / n) - ceil(s M / n)`` (so that the digit of a
  slot is ``floor(slot n / M)``, one multiplication). Because M divides the
  lower bound of the head's interval, encoding (push) and decoding (pop) are
  exact inverses for any
  state, so ``mul`` and ``div`` are exactly invertible. Each push of a radix-d
  digit adds 16 bits; each pop of a radix-n digit removes
  ``log2(M / f) = log2(n) + O(n / M)`` bits, so the buffer grows by
  ``log2(d / n)`` bits per weight per multiplication up to about 1e-4 bits,
  plus a constant. A general rANS decode with a radix that does not divide the
  interval bound is NOT invertible (we tried: one weight in 50,000 fails after
  ~400 steps), which is why non-power-of-two radices go through the frequency
  table.
"""
from __future__ import annotations

import numpy as np

from shared.errors import ConfigError, FixedPointOverflow, ReversalError

FRAC_BITS = 52
SCALE = float(2 ** FRAC_BITS)
#: |c| must stay below 2^62 so that adding two in-range numbers cannot wrap int64.
C_LIMIT = 2 ** 62
#: Largest representable magnitude, 2^62 / 2^52 = 1024.
X_LIMIT = C_LIMIT / SCALE
RADIX_BITS = 16
D = 2 ** RADIX_BITS

_U64 = np.uint64


def momentum_numerator(gamma) -> np.ndarray:
    """n = floor(gamma d) + 1, so that the applied momentum n/d is just above gamma.

    Raises ConfigError for a momentum outside (0, 1).
    """
    g = np.asarray(gamma, dtype=float)
    if not np.all(np.isfinite(g)) or np.any(g <= 0) or np.any(g >= 1):
        bad = g[~((g > 0) & (g < 1))] if g.ndim else g
        raise ConfigError(f"momentum must lie in (0, 1); got {np.ravel(bad)[:5].tolist()}")
    return np.minimum(np.floor(g * D).astype(np.int64) + 1, D)


def quantised_momentum(gamma) -> np.ndarray:
    """The momentum actually applied, n/d (float64, exact)."""
    return momentum_numerator(gamma) / D


def to_fixed(x, what="value", step=None) -> np.ndarray:
    """trunc(x * 2^52) as int64; FixedPointOverflow if |x| >= 1024 or x is not finite."""
    x = np.asarray(x, dtype=np.float64)
    bad = ~(np.abs(x) < X_LIMIT)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        where = f" at step {step}" if step is not None else ""
        raise FixedPointOverflow(
            f"{what}{where}: entry {i} is {x.flat[i]!r}, outside the fixed-point range |x| < {X_LIMIT:g} "
            f"(lower the learning rate or the initial scale)")
    return np.trunc(x * SCALE).astype(np.int64)


def from_fixed(c) -> np.ndarray:
    """Float64 view c / 2^52 (rounded to nearest for |c| > 2^53)."""
    return np.asarray(c).astype(np.float64) / SCALE


class IntBuffer:
    """Reference buffer: one unbounded Python integer per weight (the test oracle).

    push(r, M): B = B M + r;  pop(M): r = B mod M, B = B div M; an empty buffer pops 0.
    """

    def __init__(self, size: int):
        self.B = np.zeros(size, dtype=object)
        self.B[:] = 0

    def mul_step(self, r1, n) -> np.ndarray:
        """push(r1, radix d) then pop(radix n); returns r2."""
        self.B = self.B * D + np.asarray(r1, dtype=object)
        n = np.broadcast_to(np.asarray(n, dtype=object), self.B.shape)
        r2 = self.B % n
        self.B = self.B // n
        return r2.astype(np.int64)

    def div_step(self, r2, n) -> np.ndarray:
        """push(r2, radix n) then pop(radix d); returns r1."""
        self.B = self.B * np.asarray(n, dtype=object) + np.asarray(r2, dtype=object)
        r1 = self.B % D
        self.B = self.B // D
        return r1.astype(np.int64)

    def bits(self) -> float:
        return float(sum(int(b).bit_length() for b in self.B))

    def is_empty(self) -> bool:
        return not any(self.B)

    def fingerprint(self) -> int:
        return hash(tuple(self.B.tolist()))


PREC = 31
_M = _U64(2 ** PREC)
_SLOT = _U64(2 ** PREC - 1)
_RL = _U64(2 ** 31)              # lower bound of the head interval [2^31, 2^63)
_LOW32 = _U64(0xFFFFFFFF)
_SH32 = _U64(32)
_SHP = _U64(PREC)
_FD = _U64(2 ** PREC // D)       # frequency of each radix-d digit (uniform), 2^15
_SHF = _U64(PREC - RADIX_BITS)   # log2(_FD)
_FMASK = _FD - _U64(1)


def _digit_range(s, n):
    """(start, freq) of radix-n digit s: start = ceil(s M / n), freq = start(s+1) - start(s)."""
    nm1 = n - _U64(1)
    start = ((s << _SHP) + nm1) // n
    end = (((s + _U64(1)) << _SHP) + nm1) // n
    return start, end - start


class VectorBuffer:
    """Vectorised rANS buffer: a 64-bit head per weight in [2^31, 2^63) plus 32-bit words."""

    def __init__(self, size: int, capacity: int = 8):
        self.head = np.full(size, _RL, dtype=np.uint64)
        self.depth = np.zeros(size, dtype=np.int64)
        self.words = np.zeros((capacity, size), dtype=np.uint32)

    @property
    def size(self) -> int:
        return self.head.shape[0]

    def _spill(self, idx) -> None:
        d = self.depth[idx]
        if int(d.max()) >= self.words.shape[0]:
            grown = np.zeros((2 * self.words.shape[0], self.size), dtype=np.uint32)
            grown[: self.words.shape[0]] = self.words
            self.words = grown
        self.words[d, idx] = (self.head[idx] & _LOW32).astype(np.uint32)
        self.depth[idx] = d + 1
        self.head[idx] >>= _SH32

    def _refill(self) -> None:
        idx = np.flatnonzero(self.head < _RL)
        if idx.size:
            d = self.depth[idx] - 1
            if int(d.min()) < 0:
                raise ReversalError("information buffer underflow: more steps were reversed than were taken")
            self.depth[idx] = d
            self.head[idx] = (self.head[idx] << _SH32) | self.words[d, idx].astype(np.uint64)

    def _spill_above(self, limit) -> None:
        idx = np.flatnonzero(self.head >= limit)
        if idx.size:
            self._spill(idx)

    def mul_step(self, r1, n) -> np.ndarray:
        """push(r1, radix d) then pop(radix n); returns r2 (int64).

        push: x = (x div f) M + (x mod f) + r1 f with f = M / d = 2^15 (shifts only);
        pop:  slot = x mod M, s = floor(slot n / M), x = freq_s (x div M) + slot - start_s.
        """
        self._spill_above(_FD << _SH32)
        x = self.head
        x = ((x >> _SHF) << _SHP) | (x & _FMASK) | (np.asarray(r1).astype(np.uint64) << _SHF)
        n = _as_u64(n)
        slot = x & _SLOT
        s = (slot * n) >> _SHP
        start, freq = _digit_range(s, n)
        self.head = freq * (x >> _SHP) + slot - start
        self._refill()
        return s.astype(np.int64)

    def div_step(self, r2, n) -> np.ndarray:
        """push(r2, radix n) then pop(radix d); returns r1 (int64). The inverse of ``mul_step``."""
        n = _as_u64(n)
        start, freq = _digit_range(np.asarray(r2).astype(np.uint64), n)
        self._spill_above(freq << _SH32)
        x = self.head
        q = x // freq
        x = (q << _SHP) + (x - q * freq) + start
        slot = x & _SLOT
        self.head = ((x >> _SHP) << _SHF) | (slot & _FMASK)
        self._refill()
        return (slot >> _SHF).astype(np.int64)

    def bits(self) -> float:
        """Stored information in bits beyond the empty state: sum log2(x) - 31 + 32 depth."""
        return float(np.sum(np.log2(self.head.astype(np.float64)) - 31.0) + 32.0 * np.sum(self.depth))

    def is_empty(self) -> bool:
        return bool(np.all(self.head == _RL) and np.all(self.depth == 0))

    def fingerprint(self) -> int:
        return hash((self.head.tobytes(), self.depth.tobytes()))


def _as_u64(n):
    """A radix as uint64: a numpy scalar when uniform (fast division), else an array."""
    n = np.asarray(n)
    return _U64(int(n)) if n.ndim == 0 else n.astype(np.uint64)


class ExactRep:
    """A float64 vector held exactly in fixed point, with its information buffer.

    ``add``/``sub`` of the same float array are exact inverses; ``mul(n)``
    and ``div(n)`` multiply and divide by n / 2^16 exactly invertibly.
    """

    def __init__(self, x, name: str = "tensor", buffer: str = "vector"):
        x = np.asarray(x, dtype=np.float64)
        self.name = name
        self.c = to_fixed(x, name)
        self.buffer = VectorBuffer(x.size) if buffer == "vector" else IntBuffer(x.size)

    @property
    def val(self) -> np.ndarray:
        return from_fixed(self.c)

    def _checked(self, c_new, step, what) -> np.ndarray:
        bad = np.abs(c_new) >= C_LIMIT
        if np.any(bad):
            i = int(np.flatnonzero(bad)[0])
            raise FixedPointOverflow(
                f"{self.name} overflowed the fixed-point range |x| < {X_LIMIT:g} at step {step} "
                f"({what}, entry {i}); lower the learning rate or the initial scale")
        return c_new

    def add(self, a, step=None) -> "ExactRep":
        self.c = self._checked(self.c + to_fixed(a, f"increment of {self.name}", step), step, "add")
        return self

    def sub(self, a, step=None) -> "ExactRep":
        self.c = self._checked(self.c - to_fixed(a, f"decrement of {self.name}", step), step, "sub")
        return self

    def mul(self, n, step=None) -> "ExactRep":
        """c <- c * n / d exactly invertibly (n an int, or an int array, in [1, d]).

        c = (c div d) n + r2, where r1 = c mod d goes into the buffer and r2 comes out of it.
        """
        r1 = self.c & (D - 1)                      # c mod d (floor semantics, two's complement)
        self.c = (self.c >> RADIX_BITS) * n + self.buffer.mul_step(r1, n)
        return self

    def div(self, n, step=None) -> "ExactRep":
        """The inverse of ``mul(n)``: c <- (c div n) d + r1 with r2 = c mod n pushed back."""
        q = self.c // n
        r2 = self.c - q * n
        self.c = (q << RADIX_BITS) | self.buffer.div_step(r2, n)
        return self

    def fingerprint(self) -> int:
        """A hash of the exact state (value and buffer), for locating a reversal mismatch."""
        return hash((self.c.tobytes(), self.buffer.fingerprint()))
