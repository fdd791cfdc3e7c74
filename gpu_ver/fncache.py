"""A persistent cache of optimised Theano functions.

Theano caches the C code of each op, but optimises the graph again in every
process; for the DenseNet-40 training step that is 45 of the 50 seconds a
second run waits. ``function`` keeps the optimised function itself: the
first call compiles and pickles it under ``<compiledir>/hpo-functions/``,
later calls with the same graph unpickle its ``FunctionMaker`` (the optimised
graph, not optimised again: ``reoptimize_unpickled_function=False``), put the
caller's shared variables in place of the stored ones and link it once
(``_link_with``).
Every function ``gpu_ver`` compiles goes through it (training, DrMAD, the
online methods, ``models.Functions``).

The key is a SHA-256 of the graph's structure (every op with its
properties, every constant's bytes, the types and names of inputs and shared
variables, the updates), of Theano's version and the flags that change
optimisation or code (floatX, device, BLAS, openmp, optimizer settings), and
of the source of ``gpu_ver/rewrites.py`` and ``gpu_ver/conv.py``. A file
that cannot be read or does not fit is ignored and replaced; files are
written atomically. The cache is used only when every shared variable of the
graph has a distinct name (otherwise the swap could not be matched), and can
be turned off with ``HPO_FUNCTION_CACHE=0``.

On a GPU device the compiled function refers to pygpu's device context, which
cannot be pickled ("Cannot pickle GpuContext object"): it is stored as a
reference to Theano's context name and re-attached to this process's context
of that name when the file is read (``_Pickler``/``_Unpickler``).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import sys
import threading
from pathlib import Path

import numpy as np

from gpu_ver import config
from shared.notice import slow_notice
from shared.records import write_bytes_atomic

theano = config.load()
from theano.compile.sharedvalue import SharedVariable  # noqa: E402
from theano.graph.basic import Constant, graph_inputs, io_toposort  # noqa: E402

_log = logging.getLogger(__name__)
ENV_SWITCH = "HPO_FUNCTION_CACHE"
_SOURCES = ("rewrites.py", "conv.py")
_FLAGS = ("floatX", "device", "blas__ldflags", "openmp", "optimizer", "optimizer_excluding",
          "optimizer_including", "cycle_detection", "on_opt_error")
# Pickling a graph recurses along its longest path: give that a thread with room.
_RECURSION, _STACK = 200_000, 512 * 1024 * 1024


def _op_text(op) -> str:
    props = getattr(op, "__props__", None)
    extra = "" if props is None else "|" + "|".join(f"{p}={getattr(op, p)!s}" for p in props)
    return f"{type(op).__module__}.{type(op).__qualname__}:{op!s}{extra}"


def graph_key(inputs, outputs, updates, extra="") -> str:
    """SHA-256 of everything that decides the optimised function (see the module docstring);
    ``extra``: text of further compile arguments."""
    h = hashlib.sha256()
    h.update(f"theano {theano.__version__}\n{extra}\n".encode())
    for f in _FLAGS:
        h.update(f"{f}={getattr(theano.config, f, None)}\n".encode())
    here = Path(__file__).resolve().parent
    for name in _SOURCES:
        h.update(hashlib.sha256((here / name).read_bytes()).digest())
    upd = list(updates)
    roots = list(outputs) + [u for _, u in upd]
    ids: dict = {}

    def vid(v) -> str:
        if v not in ids:
            ids[v] = len(ids)
            if isinstance(v, Constant):
                data = np.asarray(v.data)
                h.update(f"C{ids[v]}:{v.type}:{data.dtype}:{data.shape}:".encode()
                         + hashlib.sha256(np.ascontiguousarray(data).tobytes()).digest())
            elif isinstance(v, SharedVariable):
                h.update(f"S{ids[v]}:{v.name}:{v.type}\n".encode())
            elif v.owner is None:
                pos = inputs.index(v) if v in inputs else -1
                h.update(f"I{ids[v]}:{pos}:{v.type}\n".encode())
        return str(ids[v])

    for v in inputs:
        vid(v)
    leaves = [v for v in graph_inputs(roots) if v not in ids]
    for v in leaves:
        vid(v)
    for node in io_toposort(list(inputs) + leaves, roots):
        h.update(f"N:{_op_text(node.op)}:{','.join(vid(i) for i in node.inputs)}->".encode())
        for o in node.outputs:
            ids[o] = len(ids)
            h.update(f"{ids[o]}:{o.type};".encode())
    h.update(("O:" + ",".join(vid(o) for o in outputs)).encode())
    h.update(("U:" + ",".join(f"{vid(s)}={vid(u)}" for s, u in upd)).encode())
    return h.hexdigest()


def _in_big_stack(fn):
    out, err = {}, {}

    def run():
        old = sys.getrecursionlimit()
        sys.setrecursionlimit(max(old, _RECURSION))
        try:
            out["v"] = fn()
        except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
            err["e"] = e
        finally:
            sys.setrecursionlimit(old)

    size = threading.stack_size()
    threading.stack_size(_STACK)
    try:
        t = threading.Thread(target=run, name="hpo-fncache")
        t.start()
    finally:
        threading.stack_size(size)
    t.join()
    if "e" in err:
        raise err["e"]
    return out["v"]


NOTICE_AFTER_S = 2.0     # a compile longer than this says so on stderr (shared.notice.slow_notice)


class _Pickler(pickle.Pickler):
    """Pickles a GPU device context as its Theano context name (persistent id)."""

    def persistent_id(self, obj):
        if type(obj).__name__ != "GpuContext":
            return None
        from theano.gpuarray.type import get_context, list_contexts  # noqa: PLC0415
        for name in list_contexts():
            if get_context(name) is obj:
                return ("gpu-context", name)
        raise pickle.PicklingError("a GPU context that Theano did not register")


class _Unpickler(pickle.Unpickler):
    """Re-attaches a stored context name to this process's context of that name."""

    def persistent_load(self, pid):
        kind, name = pid
        if kind != "gpu-context":
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        from theano.gpuarray.type import get_context  # noqa: PLC0415
        return get_context(name)


def dumps(obj) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def loads(data: bytes):
    return _Unpickler(io.BytesIO(data)).load()


def cache_dir() -> Path:
    return Path(theano.config.compiledir) / "hpo-functions"


def _shared_of(inputs, outputs, updates) -> list:
    roots = list(outputs) + [u for _, u in updates] + [s for s, _ in updates]
    return [v for v in graph_inputs(roots) if isinstance(v, SharedVariable)]


def _link_with(maker, by_name):
    """Link a stored (unpickled, unlinked) ``FunctionMaker`` on the caller's shared
    variables: each stored shared input gets the caller's variable and its storage
    (``container``), so the function reads and updates the caller's state. The graph is
    not touched (the linker binds graph inputs to the storage passed to ``create``). This is
    what ``Function.copy(swap=...)`` achieves, but the function is linked once, where
    unpickling a ``Function`` and copying it linked it twice (linking makes every C thunk,
    and on a GPU device compiles or loads every kernel)."""
    for inp in maker.inputs:
        stored = inp.variable
        if not isinstance(stored, SharedVariable):
            continue
        mine = by_name[stored.name]
        if mine.type != stored.type:
            raise TypeError(f"shared variable {stored.name}: type {mine.type} != stored {stored.type}")
        inp.variable, inp.value = mine, mine.container
    return maker.create([i.value for i in maker.inputs])


def function(inputs, outputs, updates=(), name=None, on_unused_input=None, mode=None):
    """``theano.function(inputs, outputs, updates=updates, name=name, on_unused_input=...,
    mode=...)``, through the cache. A function compiled with an explicit ``mode`` (a
    debugging or profiling mode) is not cached."""
    updates = list(updates)

    def compile_():
        with slow_notice(name or "a Theano function", after=NOTICE_AFTER_S):     # a first compile is silent
            return theano.function(inputs, outputs, updates=updates, name=name,
                                   on_unused_input=on_unused_input, mode=mode)
    if os.environ.get(ENV_SWITCH, "1") == "0" or mode is not None:
        return compile_()
    shared = _shared_of(inputs, outputs, updates)
    names = [s.name for s in shared]
    if None in names or len(set(names)) != len(names):
        return compile_()
    key = graph_key(list(inputs), list(outputs), updates, extra=f"on_unused_input={on_unused_input}")
    path = cache_dir() / f"{name or 'fn'}-{key[:32]}.pkl"
    by_name = {s.name: s for s in shared}
    if path.exists():
        try:
            maker = _in_big_stack(lambda: loads(path.read_bytes()))
            theirs = [i.variable for i in maker.inputs if isinstance(i.variable, SharedVariable)]
            if sorted(s.name for s in theirs) == sorted(names):
                return _link_with(maker, by_name)
            _log.warning("function cache: %s does not fit this graph; recompiling", path)
        except Exception as e:  # noqa: BLE001 (any unreadable entry is recompiled)
            _log.warning("function cache: cannot load %s (%s); recompiling", path, e)
    f = compile_()
    try:
        write_bytes_atomic(path, _in_big_stack(lambda: dumps(f.maker)))
    except Exception as e:  # noqa: BLE001 (the cache is an optimisation)
        _log.warning("function cache: cannot store %s (%s)", path, e)
    return f
