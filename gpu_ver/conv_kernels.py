"""Device kernels for the shifted-plane sum of the channel-major convolution (CUDA and OpenCL).

``gpu_ver/conv.py`` writes a k x k 'same' convolution as one matrix product and the linear
map ``ShiftSum`` (its eq. 2; docs/ALGORITHMS.md eq. 44), whose adjoint is ``ShiftStack``
(its eq. 3; docs/ALGORITHMS.md eq. 45):

    out[a, y, x]      = sum_{i, j} z[i k + j, a, y + i - p, x + j - p]     (2)
    s[i k + j, a, y, x] = d[a, y - i + p, x - j + p]                       (3)

(a runs over channel x image, p = k // 2, terms outside the image are zero). On the host
both are numba loops. Here each is a ``GpuKernelBase`` op whose kernel is written in
libgpuarray's kernel language (``cluda.h``), so one source compiles for CUDA and for
OpenCL. One work item computes one output element; (2) adds its k^2 terms in the same
order (i major, j minor, starting from zero) as the host loop, so the device result equals
the host's bit for bit, and no element is written by two work items (no atomics: the
results are deterministic). As on the host, each op's gradient (and R-operator) is the
other, so derivatives of every order stay exact.

``register`` adds lifters to Theano's gpuarray optimisers: a graph compiled for a GPU
device gets these ops in place of the host ones without any change to the model code.
"""
from __future__ import annotations

from gpu_ver import config

theano = config.load()
import pygpu  # noqa: E402  (present whenever Theano runs on a GPU device)
from pygpu import gpuarray  # noqa: E402
from theano.gpuarray.basic_ops import (  # noqa: E402
    GpuKernelBaseCOp, Kernel, as_gpuarray_variable, gpuarray_helper_inc_dir, infer_context_name)
from theano.gpuarray.type import GpuArrayType, gpu_context_type  # noqa: E402
from theano.graph.basic import Apply  # noqa: E402
from theano.graph.op import _NoPythonOp  # noqa: E402

_SUM = """#include "cluda.h"

KERNEL void %(name)s(const ga_ssize total, const ga_ssize m, const ga_ssize H, const ga_ssize W,
                     GLOBAL_MEM const %(ct)s *z, const ga_size z_off,
                     GLOBAL_MEM %(ct)s *out, const ga_size out_off) {
  z = (GLOBAL_MEM const %(ct)s *)(((GLOBAL_MEM const char *)z) + z_off);
  out = (GLOBAL_MEM %(ct)s *)(((GLOBAL_MEM char *)out) + out_off);
  const ga_ssize K = %(k)d, P = %(k)d / 2, HW = H * W;
  for (ga_ssize e = GID_0 * LDIM_0 + LID_0; e < total; e += LDIM_0 * GDIM_0) {
    const ga_ssize x = e %% W, y = (e / W) %% H, a = e / HW;
    %(ct)s acc = 0;
    for (ga_ssize i = 0; i < K; i++) {
      const ga_ssize yy = y + i - P;
      if (yy < 0 || yy >= H) continue;
      for (ga_ssize j = 0; j < K; j++) {
        const ga_ssize xx = x + j - P;
        if (xx < 0 || xx >= W) continue;
        acc += z[((i * K + j) * m + a) * HW + yy * W + xx];
      }
    }
    out[e] = acc;
  }
}
"""

_STACK = """#include "cluda.h"

KERNEL void %(name)s(const ga_ssize total, const ga_ssize m, const ga_ssize H, const ga_ssize W,
                     GLOBAL_MEM const %(ct)s *d, const ga_size d_off,
                     GLOBAL_MEM %(ct)s *s, const ga_size s_off) {
  d = (GLOBAL_MEM const %(ct)s *)(((GLOBAL_MEM const char *)d) + d_off);
  s = (GLOBAL_MEM %(ct)s *)(((GLOBAL_MEM char *)s) + s_off);
  const ga_ssize K = %(k)d, P = %(k)d / 2, HW = H * W;
  for (ga_ssize e = GID_0 * LDIM_0 + LID_0; e < total; e += LDIM_0 * GDIM_0) {
    const ga_ssize x = e %% W, y = (e / W) %% H, a = (e / HW) %% m, ij = e / (m * HW);
    const ga_ssize yy = y - ij / K + P, xx = x - ij %% K + P;
    s[e] = (yy >= 0 && yy < H && xx >= 0 && xx < W) ? d[a * HW + yy * W + xx] : (%(ct)s)0;
  }
}
"""

# C body shared by both ops: make the input C-contiguous, allocate the output with dims
# ``odims`` (C order), launch one work item per output element.
_CALL = """
{
  PyGpuArrayObject *src = %(inp)s;
  size_t odims[%(ond)d];
  int err;
  %(dims)s
  if (!GpuArray_IS_C_CONTIGUOUS(&src->ga)) {
    src = pygpu_copy(%(inp)s, GA_C_ORDER);
    if (src == NULL) { %(fail)s }
  } else {
    Py_INCREF(src);
  }
  if (theano_prep_output(&%(out)s, %(ond)d, odims, src->ga.typecode, GA_C_ORDER, %(ctx)s) != 0) {
    Py_DECREF(src);
    %(fail)s
  }
  size_t total = 1;
  for (int q = 0; q < %(ond)d; q++) total *= odims[q];
  if (total > 0) {
    err = %(sname)s(1, &total, 0, (ssize_t)total, (ssize_t)m, (ssize_t)H, (ssize_t)W,
                    src->ga.data, src->ga.offset, %(out)s->ga.data, %(out)s->ga.offset);
    if (err != GA_NO_ERROR) {
      PyErr_Format(PyExc_RuntimeError, "gpuarray error: %(kname)s: %%s",
                   GpuKernel_error(&%(kobj)s, err));
      Py_DECREF(src);
      %(fail)s
    }
  }
  Py_DECREF(src);
}
"""


class _GpuShiftOp(GpuKernelBaseCOp, _NoPythonOp):
    """A device version of a ``conv`` shift op of filter size k (see the module docstring)."""

    __props__ = ("k", "context_name")
    params_type = gpu_context_type
    _kernel, _in_ndim, _out_ndim = None, None, None

    def __init__(self, k, context_name=None):
        self.k, self.context_name = int(k), context_name

    def get_params(self, node):
        return node.outputs[0].type.context

    def _out_broadcastable(self, b):
        raise NotImplementedError

    def make_node(self, x):
        ctx = self.context_name if self.context_name is not None else infer_context_name(x)
        x = as_gpuarray_variable(x, ctx)
        if x.ndim != self._in_ndim:
            raise TypeError(f"{type(self).__name__} expects a {self._in_ndim}-d tensor, got {x.ndim}-d")
        out = GpuArrayType(x.dtype, self._out_broadcastable(x.broadcastable), context_name=ctx)()
        return Apply(self, [x], [out])

    def _adjoint(self):
        raise NotImplementedError

    def grad(self, inputs, output_grads):
        return [self._adjoint()(output_grads[0])]

    def R_op(self, inputs, eval_points):
        return [None if eval_points[0] is None else self(eval_points[0])]

    def c_headers(self, **kwargs):
        return ["<numpy_compat.h>", "<gpuarray/types.h>", "<gpuarray_helper.h>"]

    def c_header_dirs(self, **kwargs):
        return [gpuarray_helper_inc_dir()]

    def _kernel_name(self, name):
        return f"k_{type(self).__name__.lower()}_{name}"

    def gpu_kernels(self, node, name):
        dtype = node.inputs[0].dtype
        kname = self._kernel_name(name)
        code = self._kernel % dict(name=kname, ct=pygpu.gpuarray.dtype_to_ctype(dtype), k=self.k)
        params = [gpuarray.SSIZE] * 4 + [gpuarray.GpuArray, gpuarray.SIZE] * 2
        return [Kernel(code=code, name=kname, params=params, flags=Kernel.get_flags(dtype),
                       objvar=f"k_obj_{kname}")]

    def _dims(self, inp, fail):
        raise NotImplementedError

    def c_code(self, node, name, inp, out, sub):
        k = self.gpu_kernels(node, name)[0]
        return _CALL % dict(inp=inp[0], out=out[0], fail=sub["fail"], ctx=sub["params"],
                            ond=self._out_ndim, dims=self._dims(inp[0], sub["fail"]),
                            sname=k.sname, kname=k.name, kobj=k.objvar)

    def c_code_cache_version(self):
        return (1,)


class GpuShiftSum(_GpuShiftOp):
    """(2) on the device: z (k*k, c, n, H, W) -> out (c, n, H, W); gradient ``GpuShiftStack``."""

    _kernel, _in_ndim, _out_ndim = _SUM, 5, 4

    def _out_broadcastable(self, b):
        return (b[1], b[2], False, False)

    def _adjoint(self):
        return GpuShiftStack(self.k, self.context_name)

    def _dims(self, z, fail):
        return (f"if (PyGpuArray_DIMS({z})[0] != {self.k * self.k}) {{\n"
                f"    PyErr_Format(PyExc_ValueError, \"GpuShiftSum({self.k}): axis 0 has length %ld, "
                f"expected {self.k * self.k}\", (long)PyGpuArray_DIMS({z})[0]);\n    {fail}\n  }}\n"
                f"  for (int q = 0; q < 4; q++) odims[q] = PyGpuArray_DIMS({z})[q + 1];\n"
                f"  size_t m = odims[0] * odims[1], H = odims[2], W = odims[3];")

    def infer_shape(self, fgraph, node, shapes):
        return [tuple(shapes[0][1:])]


class GpuShiftStack(_GpuShiftOp):
    """(3) on the device: d (c, n, H, W) -> s (k*k, c, n, H, W), the adjoint of ``GpuShiftSum``."""

    _kernel, _in_ndim, _out_ndim = _STACK, 4, 5

    def _out_broadcastable(self, b):
        return (False, b[0], b[1], False, False)

    def _adjoint(self):
        return GpuShiftSum(self.k, self.context_name)

    def _dims(self, d, fail):
        return (f"odims[0] = {self.k * self.k};\n"
                f"  for (int q = 0; q < 4; q++) odims[q + 1] = PyGpuArray_DIMS({d})[q];\n"
                f"  size_t m = odims[1] * odims[2], H = odims[3], W = odims[4];")

    def infer_shape(self, fgraph, node, shapes):
        return [(self.k * self.k, *shapes[0])]


def register(host_ops) -> None:
    """Lift ``host_ops`` (``{ShiftSum: GpuShiftSum, ...}``) to the device ops in both of
    gpuarray's lifting passes (the node-by-node one and ``GraphToGPU``)."""
    from theano.gpuarray.opt import op_lifter, register_opt, register_opt2  # noqa: PLC0415

    for host, dev in host_ops.items():
        name = f"local_gpua_{host.__name__.lower()}"
        register_opt("fast_compile", name=name)(op_lifter([host])(_lifter(dev, name)))
        register_opt2([host], "fast_compile", name=name + "2")(_lifter(dev, name))


def _lifter(dev, name):
    """The lifting function for device op class ``dev`` (fgraph-first, as gpuarray's own)."""
    def lift(fgraph, op, context_name, inputs, outputs):
        return dev(op.k, context_name)

    lift.__name__ = name
    return lift
