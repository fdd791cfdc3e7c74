"""Convolution as one matrix product and a sum of shifted planes (channel-major layout).

Activations are laid out (c, n, H, W) ("CNHW": each channel's maps of the
whole batch contiguous). For x (cin, n, H, W) and filters W (cout, cin, k, k),
the 'same' cross-correlation (zero padding p = k // 2) is

    z[(i, j), o, b, y, x] = sum_c W[o, c, i, j] x[c, b, y, x]           (1)
    out[o, b, y, x] = sum_{i, j} z[(i, j), o, b, y + i - p, x + j - p]  (2)

(z taken as zero outside the image). (1) is ONE matrix product,
(k^2 cout) x cin times cin x (n H W), which BLAS runs near its peak; Theano's
``CorrMM`` instead copies k^2 cin channels per pixel (im2col) and runs one
small product per image. (2) touches only k^2 cout planes, and in a DenseNet
cout is the growth rate (12), small beside cin (up to 456).

(2) is the linear map ``ShiftSum``; its adjoint ``ShiftStack``,

    s[(i, j), o, b, y, x] = d[o, b, y - i + p, x - j + p]               (3)

is what its gradient needs. Each op's gradient is the other op, so reverse
mode through them is exact at every order (the DenseNet HVP tests take
second derivatives through them). Both are compiled (numba) loops over
contiguous image rows, one pass over the large array; the same map written
with Theano's subtensors needs a zero-padded copy of z in the forward pass,
k^2 in-place increments of a padded gradient in the backward pass, and
about a thousand more graph nodes for the optimiser. On a GPU device (CUDA or
OpenCL) Theano's gpuarray optimiser replaces both ops by device kernels with
the same arithmetic (``gpu_ver/conv_kernels.py``).

The layout also makes a DenseNet's concatenation a copy of two contiguous
blocks, a 1x1 convolution a plain product, and batch norm's per-channel
loops run over n H W contiguous values.
"""
from __future__ import annotations

import numba
import numpy as np

from gpu_ver import config

theano = config.load()
tt = theano.tensor
from theano.graph.basic import Apply  # noqa: E402
from theano.graph.op import Op  # noqa: E402


@numba.njit(cache=True, nogil=True)
def _shift_sum_kernel(z, k, out):
    """(2) for z (k*k, m, H, W), out (m, H, W), C-contiguous (m = cout n)."""
    _, m, H, W = z.shape
    p = k // 2
    out[:] = 0
    for i in range(k):
        y0, y1 = max(0, p - i), min(H, H + p - i)        # rows y with 0 <= y + i - p < H
        for j in range(k):
            x0, x1 = max(0, p - j), min(W, W + p - j)
            zt = z[i * k + j]
            for a in range(m):
                for y in range(y0, y1):
                    src = zt[a, y + i - p]
                    dst = out[a, y]
                    for x in range(x0, x1):
                        dst[x] += src[x + j - p]
    return out


@numba.njit(cache=True, nogil=True)
def _shift_stack_kernel(d, k, s):
    """(3) for d (m, H, W), s (k*k, m, H, W), C-contiguous."""
    m, H, W = d.shape
    p = k // 2
    for i in range(k):
        for j in range(k):
            st = s[i * k + j]
            for a in range(m):
                for y in range(H):
                    row = st[a, y]
                    yy = y - i + p
                    if yy < 0 or yy >= H:
                        row[:] = 0
                        continue
                    src = d[a, yy]
                    for x in range(W):
                        xx = x - j + p
                        row[x] = src[xx] if 0 <= xx < W else 0
    return s


class _ShiftOp(Op):
    """A linear map of filter size k whose gradient is its adjoint ``_adjoint()(k)``."""

    __props__ = ("k",)

    def __init__(self, k):
        self.k = int(k)

    @staticmethod
    def _adjoint():
        raise NotImplementedError

    def grad(self, inputs, output_grads):
        return [self._adjoint()(self.k)(output_grads[0])]

    def R_op(self, inputs, eval_points):
        return [None if eval_points[0] is None else self(eval_points[0])]


class ShiftSum(_ShiftOp):
    """(2): z (k*k, c, n, H, W) -> out (c, n, H, W). Linear; gradient ``ShiftStack``."""

    @staticmethod
    def _adjoint():
        return ShiftStack

    def make_node(self, z):
        z = tt.as_tensor_variable(z)
        if z.ndim != 5:
            raise TypeError(f"ShiftSum expects a 5-d tensor, got {z.ndim}-d")
        b = z.broadcastable
        return Apply(self, [z], [tt.TensorType(z.dtype, (b[1], b[2], False, False))()])

    def perform(self, node, inputs, output_storage):
        (z,) = inputs
        kk, c, n, H, W = z.shape
        if kk != self.k * self.k:
            raise ValueError(f"ShiftSum({self.k}): axis 0 has length {kk}, expected {self.k ** 2}")
        out = np.empty((c, n, H, W), dtype=z.dtype)
        _shift_sum_kernel(np.ascontiguousarray(z).reshape(kk, c * n, H, W), self.k, out.reshape(c * n, H, W))
        output_storage[0][0] = out

    def infer_shape(self, fgraph, node, shapes):
        return [tuple(shapes[0][1:])]


class ShiftStack(_ShiftOp):
    """(3): d (c, n, H, W) -> s (k*k, c, n, H, W), the adjoint of ``ShiftSum``."""

    @staticmethod
    def _adjoint():
        return ShiftSum

    def make_node(self, d):
        d = tt.as_tensor_variable(d)
        if d.ndim != 4:
            raise TypeError(f"ShiftStack expects a 4-d tensor, got {d.ndim}-d")
        b = d.broadcastable
        return Apply(self, [d], [tt.TensorType(d.dtype, (False, b[0], b[1], False, False))()])

    def perform(self, node, inputs, output_storage):
        (d,) = inputs
        c, n, H, W = d.shape
        s = np.empty((self.k ** 2, c, n, H, W), dtype=d.dtype)
        _shift_stack_kernel(np.ascontiguousarray(d).reshape(c * n, H, W), self.k, s.reshape(self.k ** 2, c * n, H, W))
        output_storage[0][0] = s

    def infer_shape(self, fgraph, node, shapes):
        return [(self.k * self.k, *shapes[0])]


def conv_gemm(x, W, n, hw, cin, cout, k):
    """'Same' cross-correlation of CNHW ``x`` (cin, n, H, W) with ``W`` (cout, cin, k, k):
    (1) as one product, then (2). ``n`` may be symbolic; k = 1 is the product alone."""
    H, Wd = hw
    rows = x.reshape((cin, n * H * Wd))
    if k == 1:
        return tt.dot(W.reshape((cout, cin)), rows).reshape((cout, n, H, Wd))
    z = tt.dot(W.dimshuffle(2, 3, 0, 1).reshape((k * k * cout, cin)), rows).reshape((k * k, cout, n, H, Wd))
    return ShiftSum(k)(z)


if config.on_gpu(theano):
    from gpu_ver import conv_kernels  # noqa: E402  (needs pygpu, present on a GPU device)
    conv_kernels.register({ShiftSum: conv_kernels.GpuShiftSum, ShiftStack: conv_kernels.GpuShiftStack})
