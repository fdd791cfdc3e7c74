"""Forward-mode derivatives of Theano graphs: the R-operator (Pearlmutter 1994).

``rop(y, wrt, v)`` is the directional derivative of ``y`` at ``wrt`` along ``v``,
propagated forward through each node's ``R_op``. Applied to the symbolic gradient
``g = grad_w L`` it gives the Hessian-vector product ``H v`` forward over reverse
(``gpu_ver.models.symbolic_grad_and_hvp(..., hvp="rop")``); the channel-major
convolution's ops define ``R_op`` (``gpu_ver/conv.py``, ``gpu_ver/conv_kernels.py``).
"""
from __future__ import annotations

from gpu_ver import config

theano = config.load()
tt = theano.tensor


def rop(y, wrt, v):
    """The directional derivative of ``y`` along ``v`` at ``wrt`` (forward mode: the
    R-operator), from each node's ``R_op``, taken only through the nodes that depend
    differentiably on ``wrt``.

    The same propagation as ``tt.Rop``, which fails on three things in these graphs
    (Theano-PyMC 1.1.2): it asks every node for its R-operator, also nodes that do not
    depend on ``wrt`` or compute integers (the one-hot labels of ``nll_per_example``
    depend on the logits through a shape, and the comparison's R-operator is a wrongly
    typed zero); ``zero_grad``'s R-operator returns a bare vector; and it refuses an
    R-operator whose broadcast pattern is less specific than the variable's (a 1x1
    filter's). Here a value that does not depend on ``wrt`` gets a zero direction
    (``None`` for integers), ``zero_grad`` cuts the derivative as in reverse mode (exact
    where it is used: the max in ``log_softmax`` cancels), and directions take their
    variable's broadcast pattern.
    """
    from theano.graph.basic import graph_inputs, io_toposort  # noqa: PLC0415

    def floating(x):
        return str(getattr(x, "dtype", "")).startswith("float")

    r = {wrt: v}
    for node in io_toposort(list(graph_inputs([y])), [y]):
        if isinstance(node.op, theano.gradient.ZeroGrad) or not any(i in r for i in node.inputs):
            continue
        evals = []
        for i in node.inputs:
            e = r.get(i)
            if e is None:
                evals.append(i.zeros_like() if floating(i) else None)
                continue
            if e.type != i.type:
                e = tt.patternbroadcast(tt.cast(e, i.dtype), i.broadcastable)
            evals.append(e)
        outs = node.op.R_op(node.inputs, evals)
        for o, e in zip(node.outputs, outs if isinstance(outs, (list, tuple)) else [outs]):
            if e is not None and floating(o):
                r[o] = e
    return r[y] if y in r else y.zeros_like()
