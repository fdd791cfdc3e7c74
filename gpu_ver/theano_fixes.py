"""Fixes to Theano-PyMC 1.1.2's GPU backend (``theano.gpuarray``), in one place.

Theano-PyMC 1.1.2 changed Theano's core interfaces (optimisers take an ``fgraph`` first
argument, the C linker passes keyword arguments, ``Op.perform`` became abstract) without
updating the gpuarray layer, which it no longer tests. On a GPU device nothing then runs on
the GPU: every op stays on the host or the compile fails (seen on an H100 and reproduced on
an OpenCL device on the CPU; docs/GPU.md). Each ``Fix`` below names the bug and its
symptom, and is a set of source patches (exact text in a module of Theano, expected a given
number of times). ``install`` applies them through an import hook, before the module is
first imported, and only on a GPU device: the CPU (C backend) path runs Theano unmodified.

A fix is applied only when every one of its patches finds its text the expected number of
times in the installed Theano; otherwise it is skipped and ``status()`` says why (the tests
assert that every fix applies, so an upgrade of Theano fails loudly there instead of
changing behaviour quietly here).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass

# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Patch:
    """Replace ``old`` by ``new`` in ``module`` (``count`` times exactly); ``old=""`` appends."""

    module: str
    old: str
    new: str
    count: int = 1


@dataclass(frozen=True)
class Fix:
    name: str
    bug: str            # what is broken in Theano-PyMC 1.1.2 and what a user sees
    patches: tuple


# --------------------------------------------------------------------------- the fixes

# Lifting optimisers take ``fgraph`` first; their callers do not pass it. ``_hpo_lift``
# passes it to whichever callable wants it (read off the function's signature: a
# ``FromFunctionLocalOptimizer`` keeps it in ``.fn``, other lifters, e.g. the pooling group,
# are inspected through the bound method they are called by).
_LIFT_HELPER = '''

_hpo_arity = {}


def _hpo_lift(call, target, fgraph, *args):
    f = getattr(target, "fn", None) or call
    n = _hpo_arity.get(f)
    if n is None:
        import inspect
        try:
            n = _hpo_arity[f] = len(inspect.signature(f).parameters)
        except (TypeError, ValueError):
            n = _hpo_arity[f] = len(args)
    return call(fgraph, *args) if n == len(args) + 1 else call(*args)
'''

_HIDE_OLD = '''    def __hide(*args):
        raise MethodNotDefined()

    c_code = __hide
    c_code_cleanup = __hide

    c_headers = __hide
    c_header_dirs = __hide
    c_libraries = __hide
    c_lib_dirs = __hide

    c_support_code = __hide
    c_support_code_apply = __hide

    c_compile_args = __hide
    c_no_compile_args = __hide
    c_init_code = __hide
    c_init_code_apply = __hide

    c_init_code_struct = __hide
    c_support_code_struct = __hide
    c_cleanup_code_struct = __hide
'''
_HIDE_NEW = '''    def __hide(*args, **kwargs):
        raise MethodNotDefined()

    c_code = __hide
    c_code_cleanup = CLinkerOp.c_code_cleanup

    c_headers = CLinkerOp.c_headers
    c_header_dirs = CLinkerOp.c_header_dirs
    c_libraries = CLinkerOp.c_libraries
    c_lib_dirs = CLinkerOp.c_lib_dirs

    c_support_code = CLinkerOp.c_support_code
    c_support_code_apply = CLinkerOp.c_support_code_apply

    c_compile_args = CLinkerOp.c_compile_args
    c_no_compile_args = CLinkerOp.c_no_compile_args
    c_init_code = CLinkerOp.c_init_code
    c_init_code_apply = CLinkerOp.c_init_code_apply

    c_init_code_struct = CLinkerOp.c_init_code_struct
    c_support_code_struct = CLinkerOp.c_support_code_struct
    c_cleanup_code_struct = CLinkerOp.c_cleanup_code_struct
'''

_DNN_GRAPH_CALL = '''_cudnn_graph(
                node.op, ctx, node.inputs, node.outputs
            )'''

_XENT_OLD = '''          for (ga_int row = GID_0; row < M; row += GDIM_0){
            GLOBAL_MEM const %(type_x)s* x = x_data + xs0 * row;
            GLOBAL_MEM %(type_x)s* sm = sm_data + sms0 * row;
            GA_DECL_SHARED_BODY(%(work_x)s, per_thread_values);
            LOCAL_MEM %(work_x)s row_max, sum, sum_inv;
            LOCAL_MEM ga_int row_max_threadIdx;
'''
_XENT_NEW = '''          GA_DECL_SHARED_BODY(%(work_x)s, per_thread_values);
          LOCAL_MEM %(work_x)s row_max, sum, sum_inv;
          LOCAL_MEM ga_int row_max_threadIdx;
          for (ga_int row = GID_0; row < M; row += GDIM_0){
            GLOBAL_MEM const %(type_x)s* x = x_data + xs0 * row;
            GLOBAL_MEM %(type_x)s* sm = sm_data + sms0 * row;
'''

_GEMV_OLD = '''        } else if (
            pygpu_blas_rgemv(cb_no_trans,'''
_GEMV_NEW = '''        } else if (
            (((dtype_%(beta)s *)PyArray_DATA(%(beta)s))[0] == (dtype_%(beta)s)0.
             && GpuArray_memset(&%(out)s->ga, 0) != GA_NO_ERROR
             && (PyErr_SetString(PyExc_RuntimeError, "Memset failed"), 1))
            ||
            pygpu_blas_rgemv(cb_no_trans,'''

FIXES = (
    Fix("optdb-name-clash",
        "theano/gpuarray/__init__.py imports optdb from theano.compile, then its own submodule "
        "called optdb replaces that name, so use(device) fails right after opening the device "
        "(\"module 'theano.gpuarray.optdb' has no attribute 'add_tags'\", logged as 'Could not "
        "initialize pygpu'): no optimisation moves computations to the GPU. The two calls get "
        "the real optimiser database under another name",
        (Patch("theano.gpuarray", "from theano.compile import optdb\n",
               "from theano.compile import optdb\nfrom theano.compile import optdb as _hpo_optdb\n"),
         Patch("theano.gpuarray", "        optdb.add_tags(", "        _hpo_optdb.add_tags(", count=2))),
    Fix("lifter-fgraph",
        "the gpuarray lifting optimisers take a new `fgraph` first argument that op_lifter and "
        "GraphToGPU do not pass: 'local_gpua_dot22() missing 1 required positional argument: "
        "outputs', and nothing moves to the GPU",
        (Patch("theano.gpuarray.opt_util",
               "new_op = maker(node.op, context_name, node.inputs, node.outputs)",
               "new_op = _hpo_lift(maker, maker, fgraph, node.op, context_name, node.inputs, node.outputs)"),
         Patch("theano.gpuarray.opt_util", "", _LIFT_HELPER),
         Patch("theano.gpuarray.opt",
               "new_ops = lopt.transform(\n                        node.op,",
               "new_ops = _hpo_lift(lopt.transform, lopt, fgraph,\n                        node.op,"),
         Patch("theano.gpuarray.opt", "", _LIFT_HELPER))),
    Fix("graph-to-gpu-len",
        "GraphToGPU.apply counts the nodes it created with len() of the generator "
        "applys_between(...): \"object of type 'generator' has no len()\"",
        (Patch("theano.gpuarray.opt",
               "node_created[lopt] += len(\n                    applys_between(",
               "node_created[lopt] += len(\n                    list(applys_between("),
         Patch("theano.gpuarray.opt",
               "applys_between([mapping[i] for i in node.inputs], outputs)\n                )",
               "applys_between([mapping[i] for i in node.inputs], outputs))\n                )"))),
    Fix("hidec-optional-methods",
        "HideC's hiding function takes no keyword arguments, but the C linker now passes "
        "c_compiler=: \"HideC.__hide() got an unexpected keyword argument 'c_compiler'\"; and "
        "the optional C methods it hides raise MethodNotDefined, which the linker no longer "
        "catches, so GpuElemwise and GpuCAReduceCuda get no C thunk ('No Python "
        "implementation is provided by this Op'). Only c_code stays hidden; the optional "
        "methods (c_code_cleanup included) return their empty defaults",
        (Patch("theano.link.c.interface", _HIDE_OLD, _HIDE_NEW),)),
    Fix("abstract-perform",
        "Op.perform became abstract, so GPU ops without a Python implementation cannot be "
        "instantiated: \"Can't instantiate abstract class GpuMaxAndArgmax\" (also "
        "GPUA_mrg_uniform, GpuMagmaBase) at import of theano.gpuarray",
        (Patch("theano.gpuarray.reduction", "from theano.graph.op import COp\n",
               "from theano.graph.op import COp, _NoPythonCOp\n"),
         Patch("theano.gpuarray.reduction", "class GpuMaxAndArgmax(COp):",
               "class GpuMaxAndArgmax(_NoPythonCOp):"),
         Patch("theano.gpuarray.rng_mrg", "class GPUA_mrg_uniform(GpuKernelBase, mrg_uniform_base):",
               "class GPUA_mrg_uniform(GpuKernelBase, __import__('theano.graph.op', fromlist=['_NoPythonOp'])._NoPythonOp, mrg_uniform_base):"),
         Patch("theano.gpuarray.linalg", "from theano.graph.op import ExternalCOp, Op\n",
               "from theano.graph.op import ExternalCOp, Op, _NoPythonExternalCOp\n"),
         Patch("theano.gpuarray.linalg", "class GpuMagmaBase(ExternalCOp):",
               "class GpuMagmaBase(_NoPythonExternalCOp):"))),
    Fix("direct-graph-calls",
        "fgraph-first optimisers called directly without fgraph (the assert, shape and "
        "specify_shape lifters; the cuDNN conv optimisers and dnn_conv): 'missing 1 required "
        "positional argument', and AbstractConv2d finds no GPU implementation",
        (Patch("theano.gpuarray.opt", "return local_gpua_specifyShape_graph(op, context_name,",
               "return local_gpua_specifyShape_graph(fgraph, op, context_name,"),
         Patch("theano.gpuarray.opt", "return local_gpua_shape_graph(op, context_name,",
               "return local_gpua_shape_graph(fgraph, op, context_name,"),
         Patch("theano.gpuarray.opt", "return local_gpua_assert_graph(op, context_name,",
               "return local_gpua_assert_graph(fgraph, op, context_name,"),
         Patch("theano.gpuarray.dnn_opt", _DNN_GRAPH_CALL,
               _DNN_GRAPH_CALL.replace("node.op, ctx", "fgraph, node.op, ctx"), count=6),
         Patch("theano.gpuarray.dnn_opt", "rval = dnn_conv(\n            inp1,",
               "rval = dnn_conv(\n            fgraph,\n            inp1,"))),
    Fix("xent-local-memory",
        "GpuCrossentropySoftmaxArgmax1HotWithBias's kernel declares local memory inside a "
        "loop, which OpenCL forbids: the kernel fails to build (the message shows only with "
        "POCL_DEBUG=all). Declared at kernel scope; the op's cache version is bumped",
        (Patch("theano.gpuarray.nnet", _XENT_OLD, _XENT_NEW),
         Patch("theano.gpuarray.nnet",
               "        return (14,)\n\n\ngpu_crossentropy_softmax_argmax_1hot_with_bias = (",
               "        return (14, 1)\n\n\ngpu_crossentropy_softmax_argmax_1hot_with_bias = ("))),
    Fix("fusion-gpu-test-value",
        "the elemwise fusion optimiser takes `.flatten()[0]` of a constant's value, which for "
        "a GPU constant is a pygpu array that has no such indexing: local_fuse aborts and GPU "
        "graphs stay unfused. The value goes through numpy first",
        (Patch("theano.tensor.opt", "tmp.tag.test_value = tv.flatten()[0]",
               "tmp.tag.test_value = np.asarray(tv).flatten()[0]"),
         Patch("theano.tensor.opt", "s.tag.test_value = v.flatten()[0]",
               "s.tag.test_value = np.asarray(v).flatten()[0]"))),
    Fix("minmax-nan-literal",
        "the C code of the scalar maximum and minimum writes their NaN result (an operand is "
        "NaN) as the C library call nan(\"\"); OpenCL's nan() takes an unsigned nancode, so every "
        "GPU elemwise kernel with a max or min (the online methods' clipping and positivity "
        "floors) fails to build on OpenCL (\"no matching function for call to '_cl_nan'\") "
        "and the process crashes in pocl. The NaN is written as x + y, which is NaN in every "
        "C dialect whenever both comparisons fail (one operand is NaN); the two ops' cache version "
        "is bumped (compiled modules are keyed by it, not by their source)",
        (Patch("theano.scalar.basic", """f'(({x})>=({y})? ({x}): nan("")));'""",
               """f'(({x})>=({y})? ({x}): ({x}) + ({y})));'\n\n"""
               """    def c_code_cache_version(self):\n        return (4, 1)"""),
         Patch("theano.scalar.basic", """f'(({x})<=({y})? ({x}): nan("")));'""",
               """f'(({x})<=({y})? ({x}): ({x}) + ({y})));'\n\n"""
               """    def c_code_cache_version(self):\n        return (4, 1)"""))),
    Fix("gemv-beta-zero",
        "GpuGemv passes uninitialised memory as y when beta = 0, and CLBlast's gemv still "
        "computes 0*y (0*NaN = NaN): matrix-vector products are NaN from step 0 on OpenCL. "
        "The output is zeroed first when beta = 0; the op's cache version is bumped",
        (Patch("theano.gpuarray.blas", _GEMV_OLD, _GEMV_NEW),
         Patch("theano.gpuarray.blas",
               "    def c_code_cache_version(self):\n        return (10,)\n\n\ngpugemv_no_inplace",
               "    def c_code_cache_version(self):\n        return (10, 1)\n\n\ngpugemv_no_inplace"))),
)


# --------------------------------------------------------------------------- checking
def theano_dir() -> str | None:
    """Folder of the installed ``theano`` package, found without importing it."""
    spec = importlib.util.find_spec("theano")
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def module_file(module: str, root: str) -> str:
    """Source file of ``module`` (``theano.x.y``) under the package folder ``root``."""
    base = os.path.join(root, *module.split(".")[1:])
    return os.path.join(base, "__init__.py") if os.path.isdir(base) else base + ".py"


def problems(fix: Fix, root: str) -> list:
    """Why ``fix`` does not apply to the Theano in ``root`` (empty list: it applies).

    Patches are applied in order, so a later patch is checked on the source the earlier
    ones produced."""
    out, texts = [], {}
    for p in fix.patches:
        if p.module not in texts:
            path = module_file(p.module, root)
            try:
                with open(path, encoding="utf-8") as fh:
                    texts[p.module] = fh.read()
            except OSError as e:
                out.append(f"{p.module}: cannot read {path} ({e.strerror})")
                texts[p.module] = None
        src = texts[p.module]
        if src is None or not p.old:
            continue
        n = src.count(p.old)
        if n != p.count:
            first = p.old.strip().splitlines()[0]
            out.append(f"{p.module}: expected {p.count} occurrence(s) of {first!r}, found {n}")
        else:
            texts[p.module] = src.replace(p.old, p.new)
    return out


def status(root: str | None = None) -> dict:
    """``{fix name: "applies" | reason}`` for the installed Theano (nothing imported)."""
    root = root or theano_dir()
    if root is None:
        return {f.name: "theano is not installed" for f in FIXES}
    return {f.name: ("applies" if not (why := problems(f, root)) else "; ".join(why)) for f in FIXES}


def patch_source(module: str, src: str, fixes) -> str:
    """``src`` of ``module`` with the patches of ``fixes`` applied (pure)."""
    for fix in fixes:
        for p in fix.patches:
            if p.module == module:
                src = src + p.new if not p.old else src.replace(p.old, p.new)
    return src


# --------------------------------------------------------------------------- installing
class _PatchFinder:
    """Meta-path finder that loads the patched modules from patched source."""

    def __init__(self, fixes):
        self.fixes = tuple(fixes)
        self.modules = {p.module for f in self.fixes for p in f.patches}

    def find_spec(self, name, path=None, target=None):
        if name not in self.modules:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or not (spec.origin or "").endswith(".py"):
            return None
        fixes = self.fixes

        class _Loader(importlib.machinery.SourceFileLoader):
            def get_code(self, fullname):
                src = self.get_data(self.path).decode("utf-8")
                return compile(patch_source(fullname, src, fixes), self.path, "exec", dont_inherit=True)

        spec.loader = _Loader(name, spec.origin)
        return spec


def install() -> dict:
    """Install (once per process, before ``import theano``) the fixes that apply; return ``status()``.

    Raises RuntimeError when a patched module was already imported (the fix would be lost)."""
    st = status()
    if any(isinstance(f, _PatchFinder) for f in sys.meta_path):
        return st
    ok = [f for f in FIXES if st[f.name] == "applies"]
    for name, why in st.items():
        if why != "applies":
            logging.getLogger("gpu_ver.theano_fixes").warning(
                "Theano fix %s not applied (Theano's source differs from what it was written for): %s", name, why)
    early = sorted({p.module for f in ok for p in f.patches} & set(sys.modules))
    if early:
        raise RuntimeError(f"theano_fixes.install() must run before importing {', '.join(early)}")
    sys.meta_path.insert(0, _PatchFinder(ok))
    return st
