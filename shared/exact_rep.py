"""Exact-arithmetic storage for reversible SGD with momentum.

Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter Optimization
through Reversible Learning", ICML 2015, section 2.3 and appendix.

Weights and velocities are held in fixed point, ``c = trunc(x * 2^52)`` as
int64. Adding a float ``a`` adds ``trunc(a * 2^52)`` and is undone exactly by
subtracting the same float. Multiplying by a momentum ``gamma ~ n / d`` with
``d = 2^16`` (``RADIX``) and ``n = floor(gamma d) + 1`` destroys ``log2(d / n)`` bits per
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
  streaming range-variant ANS coder (Duda 2013; the coder Townsend et al. 2019
  use for bits-back). Each weight has a 64-bit head ``x`` kept in
  ``[2^31, 2^47)`` between operations and a stack of 16-bit words. Symbols are
  coded with probability precision ``M = 2^31``: the radix-d digit ``r1``
  with frequency ``M / d = 2^15`` (exactly uniform) and the radix-n digit
  ``s`` with start ``ceil(s M / n)`` and frequency
  ``f_s = ceil((s+1) M / n) - ceil(s M / n)`` (so the digit of a slot is
  ``floor(slot n / M)``). One multiplication is::

      y = (x div 2^15) M + (x mod 2^15) + r1 2^15      push r1: y in [2^47, 2^63)
      s = floor((y mod M) n / M)                       pop s:
      z = f_s (y div M) + (y mod M) - start_s          z in [f_s 2^16, f_s 2^32), z >= 2^31
      while z >= 2^47: spill z mod 2^16; z = z div 2^16

  and its inverse starts with ``while x < f_s 2^16: x = x 2^16 + unspill``:
  the interval ``[f_s 2^16, f_s 2^32)`` spans exactly one factor 2^16, so the
  number of spilled words is determined (rANS's b-uniqueness, with M dividing
  the bound). The forward push never spills and the forward pop never reads
  the stack, so the buffer spills one word per ``16 / log2(d/n)`` steps (about
  100 at momentum 0.9) instead of moving words at every step. Each push adds
  16 bits and each pop removes ``log2(M / f_s) = log2(n) + O(n / M)`` bits: the
  buffer grows by ``log2(d / n)`` bits per weight per multiplication (to about
  1e-4 bits), plus a constant below 16 bits. (A plain rANS pop with a radix
  that does not divide the lower bound of the head's interval is not
  invertible: one weight in 50,000 failed after a few hundred steps in a first
  attempt; hence the frequency table.)
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
#: d = 2^16: the momentum gamma is applied as n / d, and d is the radix of the digits that
#: multiplying by n / d pushes into the buffer (``d`` in the module docstring).
RADIX = 2 ** RADIX_BITS
D = RADIX   # the former name; kept while shared.schedule and shared.reversal import it

_U64 = np.uint64


def momentum_numerator(gamma) -> np.ndarray:
    """n = floor(gamma d) + 1, so that the applied momentum n/d is just above gamma.

    Raises ConfigError for a momentum outside (0, 1).
    """
    g = np.asarray(gamma, dtype=float)
    if not np.all(np.isfinite(g)) or np.any(g <= 0) or np.any(g >= 1):
        bad = g[~((g > 0) & (g < 1))] if g.ndim else g
        raise ConfigError(f"momentum must lie in (0, 1); got {np.ravel(bad)[:5].tolist()}")
    n = np.floor(g * RADIX).astype(np.int64) + 1
    if np.any(n >= RADIX):
        raise ConfigError(f"momentum {float(np.max(g))!r} is too close to 1: with the 2^-16 quantisation it "
                          f"would be applied as exactly 1 (use at most {1 - 2.0 ** -15:.6f})")
    return n


def quantised_momentum(gamma) -> np.ndarray:
    """The momentum actually applied, n/d (float64, exact)."""
    return momentum_numerator(gamma) / RADIX


def to_fixed(x, what="value", step=None) -> np.ndarray:
    """trunc(x * 2^52) as int64; FixedPointOverflow if |x| >= 1024 or x is not finite."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        t = x * SCALE                               # exact: scaling by a power of two
    if x.size and not np.max(np.abs(t)) < C_LIMIT:  # NaN propagates through max and fails too
        bad = ~(np.abs(x) < X_LIMIT)
        i = int(np.flatnonzero(bad)[0])
        where = f" at step {step}" if step is not None else ""
        raise FixedPointOverflow(
            f"{what}{where}: entry {i} is {x.flat[i]!r}, outside the fixed-point range |x| < {X_LIMIT:g} "
            f"(lower the learning rate or the initial scale)")
    return t.astype(np.int64)                       # the C cast truncates toward zero


def from_fixed(c) -> np.ndarray:
    """Float64 view c / 2^52 (rounded to nearest for |c| > 2^53)."""
    return np.asarray(c).astype(np.float64) / SCALE


def _check_quotient(q) -> None:
    """Division by a momentum must not leave the fixed-point range (|c div n| < 2^46)."""
    lim = C_LIMIT >> RADIX_BITS                  # then -2^62 <= q d + r1 < 2^62: no wrap
    if q.size and (int(q.max()) >= lim or int(q.min()) < -lim):
        raise FixedPointOverflow(f"division by the momentum left the fixed-point range |x| < {X_LIMIT:g}")


class _FixedPointOps:
    """``mul_fixed``/``div_fixed`` on top of a buffer's ``mul_step``/``div_step``."""

    def mul_fixed(self, c, n) -> np.ndarray:
        """c * n / d on fixed-point integers: (c div d) n + pop_n, with c mod d pushed."""
        return (c >> RADIX_BITS) * n + self.mul_step(c & (RADIX - 1), n)

    def div_fixed(self, c, n) -> np.ndarray:
        """The inverse of ``mul_fixed``: (c div n) d + pop_d, with c mod n pushed."""
        q = c // n
        _check_quotient(q)
        return (q << RADIX_BITS) | self.div_step(c - q * n, n)


class IntBuffer(_FixedPointOps):
    """Reference buffer: one unbounded Python integer per weight (the test oracle).

    push(r, M): B = B M + r;  pop(M): r = B mod M, B = B div M; an empty buffer pops 0.
    """

    def __init__(self, size: int):
        self.B = np.zeros(size, dtype=object)
        self.B[:] = 0

    def mul_step(self, r1, n) -> np.ndarray:
        """push(r1, radix d) then pop(radix n); returns r2."""
        self.B = self.B * RADIX + np.asarray(r1, dtype=object)
        n = np.broadcast_to(np.asarray(n, dtype=object), self.B.shape)
        r2 = self.B % n
        self.B = self.B // n
        return r2.astype(np.int64)

    def div_step(self, r2, n) -> np.ndarray:
        """push(r2, radix n) then pop(radix d); returns r1."""
        self.B = self.B * np.asarray(n, dtype=object) + np.asarray(r2, dtype=object)
        r1 = self.B % RADIX
        self.B = self.B // RADIX
        return r1.astype(np.int64)

    def bits(self) -> float:
        return float(sum(int(b).bit_length() for b in self.B))

    def is_empty(self) -> bool:
        return not any(self.B)

    def fingerprint(self) -> int:
        return hash(tuple(self.B.tolist()))


PREC = 31
_SLOT = _U64(2 ** PREC - 1)
_LO = _U64(2 ** 31)             # the head lives in [2^31, 2^47) between operations
_HI = _U64(2 ** 47)
_LOW16 = _U64(0xFFFF)
_SH16 = _U64(16)
_SHP = _U64(PREC)
_FD = _U64(2 ** PREC // RADIX)  # frequency of each radix-d digit (uniform), 2^15
_SHF = _U64(PREC - RADIX_BITS)  # log2(_FD)
_FMASK = _FD - _U64(1)
_MF = np.float64(2 ** PREC)


def _digit_range(s, n):
    """(start, freq) of radix-n digit s: start = ceil(s M / n), freq = start(s+1) - start(s).

    Computed in float64, which is exact here: s M < 2^47 and n <= 2^16 are exact, the
    quotient is correctly rounded, and a non-integer quotient is at least 1/n >= 2^-16
    away from an integer while the rounding error is below 2^-21.
    """
    sm = s.astype(np.float64) * _MF
    nf = np.float64(n) if np.ndim(n) == 0 else n.astype(np.float64)
    start = np.ceil(sm / nf)
    end = np.ceil((sm + _MF) / nf)
    return start.astype(np.uint64), (end - start).astype(np.uint64)


def next_rows(rows: int, need: int) -> int:
    """Rows of 16-bit words a buffer holding ``rows`` allocates when a weight needs ``need``.

    Growth by 1/32 (at least to ``need``, at least one row): the words allocated stay within
    about 3 % of the deepest weight's depth, where doubling wasted up to half of them; the
    cost of growing stays amortised O(1) per row because ``grow_rows`` extends in place."""
    return max(need, rows + rows // 32 + 1)


def grow_rows(words: np.ndarray, need: int) -> np.ndarray:
    """``words`` (rows x weights, C order) with at least ``need`` rows, the new rows zero.

    Rows are the leading axis, so appending rows keeps every existing word at its address:
    ``ndarray.resize`` extends the allocation in place (``realloc``, which remaps the pages
    of a large block instead of copying them), so the peak is the new size, not old + new.
    An array that does not own its data, or has views, is copied instead."""
    rows = next_rows(words.shape[0], need)
    try:
        words.resize((rows, words.shape[1]))
        return words
    except ValueError:
        grown = np.zeros((rows, words.shape[1]), dtype=words.dtype)
        grown[: words.shape[0]] = words
        return grown


class VectorBuffer(_FixedPointOps):
    """Vectorised rANS buffer: a 64-bit head per weight in [2^31, 2^47) plus 16-bit words."""

    def __init__(self, size: int, capacity: int = 8):
        self.head = np.full(size, _LO, dtype=np.uint64)
        self.depth = np.zeros(size, dtype=np.int64)
        self.words = np.zeros((capacity, size), dtype=np.uint16)
        self._tables = {}

    @property
    def size(self) -> int:
        return self.head.shape[0]

    def _digit_range(self, s, n):
        """``_digit_range`` through a cached table of starts when n is uniform (two gathers)."""
        if np.ndim(n):
            return _digit_range(s, n)
        tab = self._tables.get(int(n))
        if tab is None:
            if len(self._tables) > 64:
                self._tables.clear()
            tab = _digit_range(np.arange(int(n) + 1, dtype=np.uint64), n)[0]
            self._tables[int(n)] = tab
        i = s.view(np.int64)                      # digits are < 2^16: same bits
        start = tab.take(i)
        return start, tab.take(i + 1) - start

    def _spill(self, idx) -> None:
        while idx.size:
            d = self.depth[idx]
            if int(d.max()) >= self.words.shape[0]:
                self.words = grow_rows(self.words, int(d.max()) + 1)
            self.words[d, idx] = (self.head[idx] & _LOW16).astype(np.uint16)
            self.depth[idx] = d + 1
            self.head[idx] >>= _SH16
            idx = idx[self.head[idx] >= _HI]

    def _unspill(self, idx, bound) -> None:
        while idx.size:
            d = self.depth[idx] - 1
            if int(d.min()) < 0:
                raise ReversalError("information buffer underflow: more steps were reversed than were taken")
            self.depth[idx] = d
            self.head[idx] = (self.head[idx] << _SH16) | self.words[d, idx].astype(np.uint64)
            idx = idx[self.head[idx] < (bound if np.ndim(bound) == 0 else bound[idx])]

    def mul_step(self, r1, n) -> np.ndarray:
        """push(r1, radix d) then pop(radix n); returns the popped digit r2 (int64)."""
        x = self.head
        y = ((x >> _SHF) << _SHP) | (x & _FMASK) | (np.asarray(r1).astype(np.uint64) << _SHF)
        n = _as_u64(n)
        slot = y & _SLOT
        s = (slot * n) >> _SHP
        start, freq = self._digit_range(s, n)
        self.head = freq * (y >> _SHP) + slot - start
        idx = np.flatnonzero(self.head >= _HI)
        if idx.size:
            self._spill(idx)
        return s.astype(np.int64)

    def div_step(self, r2, n) -> np.ndarray:
        """push(r2, radix n) then pop(radix d); returns r1 (int64). The inverse of ``mul_step``."""
        n = _as_u64(n)
        start, freq = self._digit_range(np.asarray(r2).astype(np.uint64), n)
        bound = freq << _SH16
        idx = np.flatnonzero(self.head < bound)
        if idx.size:
            self._unspill(idx, bound)
        z = self.head
        q = z // freq
        y = (q << _SHP) + (z - q * freq) + start
        self.head = ((y >> _SHP) << _SHF) | (y & _FMASK)
        return ((y & _SLOT) >> _SHF).astype(np.int64)

    def bits(self) -> float:
        """Stored information in bits beyond the empty state: sum log2(x) - 31 + 16 depth."""
        return float(np.sum(np.log2(self.head.astype(np.float64)) - 31.0) + 16.0 * np.sum(self.depth))

    def is_empty(self) -> bool:
        return bool(np.all(self.head == _LO) and np.all(self.depth == 0))

    def fingerprint(self) -> int:
        return hash((self.head.tobytes(), self.depth.tobytes()))


class FastBuffer(VectorBuffer):
    """``VectorBuffer`` with its arithmetic in compiled one-pass kernels (``exact_kernels``).

    Same state layout and bit-identical results (tested); also fuses the fixed-point
    update of c with the buffer operations."""

    def __init__(self, size: int, capacity: int = 8):
        super().__init__(size, capacity)
        self._maxd = 0

    def _ensure_rows(self, extra: int) -> None:
        need = self._maxd + extra
        if need > self.words.shape[0]:
            self.words = grow_rows(self.words, need)

    def mul_fixed(self, c, n) -> np.ndarray:
        from shared import exact_kernels as K
        self._ensure_rows(3)                         # a multiplication spills at most 2 words
        self._maxd = max(self._maxd, int(K.mul_kernel(c, self.head, self.depth, self.words,
                                                      np.asarray(n, dtype=np.int64).reshape(-1))))
        return c

    def div_fixed(self, c, n) -> np.ndarray:
        from shared import exact_kernels as K
        bad = int(K.div_kernel(c, self.head, self.depth, self.words, np.asarray(n, dtype=np.int64).reshape(-1)))
        if bad < -1:
            raise FixedPointOverflow(f"division by the momentum left the fixed-point range |x| < {X_LIMIT:g} "
                                     f"(entry {-bad - 2})")
        if bad >= 0:
            raise ReversalError("information buffer underflow: more steps were reversed than were taken")
        return c


def _has_numba() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


BUFFERS = {"vector": FastBuffer if _has_numba() else VectorBuffer, "numpy": VectorBuffer, "int": IntBuffer}


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
        """``buffer``: 'vector' (compiled kernels; numpy if numba is absent), 'numpy', or
        'int' (the Python-integer oracle)."""
        if buffer not in BUFFERS:
            raise ConfigError(f"buffer must be one of {sorted(BUFFERS)}, got {buffer!r}")
        x = np.asarray(x, dtype=np.float64)
        self.name = name
        self.c = to_fixed(x, name)
        self.buffer = BUFFERS[buffer](x.size)

    @property
    def val(self) -> np.ndarray:
        return from_fixed(self.c)

    def _checked(self, c_new, step, what) -> np.ndarray:
        # |c| < 2^62 for both operands, so the int64 sum cannot wrap; check the result.
        if c_new.size and max(int(c_new.max()), -int(c_new.min())) >= C_LIMIT:
            i = int(np.flatnonzero(np.abs(c_new) >= C_LIMIT)[0])
            self._overflow(step, what, i)
        return c_new

    def _overflow(self, step, what, i):
        raise FixedPointOverflow(
            f"{self.name} overflowed the fixed-point range |x| < {X_LIMIT:g} at step {step} "
            f"({what}, entry {i}); lower the learning rate or the initial scale")

    def _add(self, a, step, sign, what) -> "ExactRep":
        if isinstance(self.buffer, FastBuffer):
            from shared import exact_kernels as K
            a = np.ascontiguousarray(np.broadcast_to(np.asarray(a, dtype=np.float64), self.c.shape))
            r = int(K.add_kernel(self.c, a, sign))
            if r == -1:
                return self
            i = r if r >= 0 else -r - 2
            self.c[:i] -= sign * to_fixed(a[:i])        # the kernel stopped at entry i: undo 0..i-1
            if r >= 0:
                to_fixed(a[r:r + 1], f"{what} of {self.name} (entry {r})", step)   # raises, naming it
            self._overflow(step, what, i)
        inc = to_fixed(a, f"{what} of {self.name}", step)
        self.c = self._checked(self.c + inc if sign > 0 else self.c - inc, step, what)
        return self

    def add(self, a, step=None) -> "ExactRep":
        return self._add(a, step, 1, "increment")

    def sub(self, a, step=None) -> "ExactRep":
        return self._add(a, step, -1, "decrement")

    def mul(self, n, step=None) -> "ExactRep":
        """c <- c * n / d exactly invertibly (n an int, or an int array, in [1, d]).

        c = (c div d) n + r2, where r1 = c mod d goes into the buffer and r2 comes out of it.
        """
        self.c = self.buffer.mul_fixed(self.c, n)
        return self

    def div(self, n, step=None) -> "ExactRep":
        """The inverse of ``mul(n)``: c <- (c div n) d + r1 with r2 = c mod n pushed back."""
        try:
            self.c = self.buffer.div_fixed(self.c, n)
        except FixedPointOverflow as e:
            raise FixedPointOverflow(f"{self.name} at step {step}: {e}") from None
        return self

    def fingerprint(self) -> int:
        """A hash of the exact state (value and buffer), for locating a reversal mismatch."""
        return hash((self.c.tobytes(), self.buffer.fingerprint()))
