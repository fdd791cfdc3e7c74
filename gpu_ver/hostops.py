"""Which parts of a compiled Theano function run on the host when it was compiled for a GPU.

Theano's gpuarray optimiser moves an op to the device only when it has a device version
for it; anything else stays on the host, silently, with a copy of its inputs from the device
and of its outputs back (a graph that "runs on the GPU" can spend most of its time in such
round trips). ``host_ops(f)`` lists the nodes of ``f`` that compute on floating-point
arrays on the host; shape arithmetic (integers, and float scalars made from them) and the
transfers of the function's own inputs and outputs are not computations and are not listed. The tests
assert that the training step, DrMAD's reverse step and the online methods' updates list
nothing on a GPU device beyond ``ALLOWED`` (small, named exceptions).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

# Host computations accepted on a GPU device, by op class name, with the reason.
ALLOWED = {
    "MaxAndArgmax": "argmax of the (batch x classes) logits for the error count: OpenCL has no "
                    "device argmax (GpuMaxAndArgmax is CUDA only); a few hundred numbers",
    "Max": "max of the (batch x classes) logits in log-softmax (a constant shift, no gradient): "
           "OpenCL's reduction op does only add and mul",
}


@dataclass(frozen=True)
class HostOp:
    op: str            # op class name
    text: str          # the op as Theano prints it
    shapes: tuple      # output types (dtype, ndim)


def _is_float_tensor(var) -> bool:
    t = var.type
    return type(t).__name__ == "TensorType" and str(getattr(t, "dtype", "")).startswith("float")


def _computes_on_data(node) -> bool:
    """Does host ``node`` compute on floating-point arrays? A float result, with an array
    (ndim >= 1) among its float inputs or outputs: a reduction of an array to a number
    counts, arithmetic on shape-derived scalars (e.g. n / (n - 1) in batch norm) does not."""
    floats = [v for v in list(node.inputs) + list(node.outputs) if _is_float_tensor(v)]
    return any(_is_float_tensor(o) for o in node.outputs) and any(v.type.ndim >= 1 for v in floats)


def host_ops(f) -> list:
    """Nodes of compiled function ``f`` that compute on host floating-point arrays."""
    out = []
    for node in f.maker.fgraph.toposort():
        name = type(node.op).__name__
        if name.startswith("Gpu") or name in ("HostFromGpu", "GpuFromHost"):
            continue
        if _computes_on_data(node):
            out.append(HostOp(name, str(node.op), tuple((o.type.dtype, o.type.ndim) for o in node.outputs)))
    return out


def unexpected(f, allowed=ALLOWED) -> list:
    """``host_ops(f)`` less the named exceptions in ``allowed``."""
    return [h for h in host_ops(f) if h.op not in allowed]


def summary(f) -> dict:
    """``{op class name: count}`` of the host computations of ``f``."""
    return dict(Counter(h.op for h in host_ops(f)))
