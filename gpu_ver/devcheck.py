"""``python -m gpu_ver devcheck``: this GPU device against Theano's C backend, in one process.

On a GPU device (``--device cuda|opencl``) each check compiles the same graph twice: once
for the device (what every gpu_ver command runs) and once with the gpuarray optimisations
excluded, which is Theano's C backend on the host, and compares the two:

``grad``   the DenseNet training gradient grad_w L (batch norm with batch statistics)
``hvp``    the Hessian-vector product H v (reverse over reverse)
``step``   one SGD training step with Nesterov momentum and the BN running averages

For each compiled device function it also lists the host computations
(``gpu_ver/hostops.py``): anything but the named exceptions is a failure, since it would
copy data between host and device at every call. Targets: relative difference (max |a - b|
/ max |b|) <= 1e-5 in float32 (the two backends sum in other orders), 1e-12 in float64.
Exit status 1 if a target is missed or an unexpected host op is found.
"""
from __future__ import annotations

import time

import numpy as np

TARGETS = {"float32": 1e-5, "float64": 1e-12}
PARTS = ("grad", "hvp", "step")


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = float(np.max(np.abs(a - b)))
    return 0.0 if d == 0 else d / max(float(np.max(np.abs(b))), 1e-300)


def _c_mode(theano):
    return theano.compile.mode.get_default_mode().excluding("gpuarray")


def _timed(make):
    t = time.perf_counter()
    f = make()
    return f, round(time.perf_counter() - t, 1)


def _pair(theano, fncache, ins, outs, name):
    """(device function through the function cache, the same graph on the C backend)."""
    return (lambda: fncache.function(ins, outs, name=f"devcheck_{name}"),
            lambda: theano.function(ins, outs, mode=_c_mode(theano)))


def check(depth=7, growth=4, image_size=8, batch=8, n_classes=10, seed=0, parts=PARTS, progress=print) -> dict:
    """Compile and compare the ``parts`` on a DenseNet; a dict of figures (see the module doc)."""
    from gpu_ver import config  # noqa: PLC0415
    theano = config.load()
    from gpu_ver import fncache, hostops  # noqa: PLC0415
    from gpu_ver import models as M  # noqa: PLC0415
    tt = theano.tensor
    fx = str(theano.config.floatX)
    net = M.DenseNet(depth=depth, growth=growth, input_shape=(3, image_size, image_size),
                     activation="softplus", n_classes=n_classes, batch_size=batch)
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((batch, 3, image_size, image_size)).astype(fx)
    y = rng.integers(0, n_classes, batch).astype(np.int64)
    w0 = (net.init(seed) + 0.1 * rng.standard_normal(net.layout.size)).astype(fx)
    l2 = np.full(net.layout.size, 1e-3, fx)
    v = rng.standard_normal(net.layout.size).astype(fx)
    out = {"device": str(theano.config.device), "floatX": fx, "on_gpu": config.on_gpu(theano),
           "net": net.describe(), "target": TARGETS[fx], "rel_diff": {}, "compile_s": {}, "host_compile_s": {},
           "host_ops": {}, "unexpected_host_ops": {}}
    wv, l2v, Xv, yv, vv = tt.vector("w"), tt.vector("l2"), net.input_var("X"), tt.lvector("y"), tt.vector("v")
    for part in parts:
        progress(f"devcheck: {part} for {out['device']} and for the C backend "
                 f"(compiling: minutes the first time on a machine)")
        if part == "grad":
            g, _, _ = M.symbolic_grad(net, wv, Xv, yv, l2v)
            make_dev, make_host = _pair(theano, fncache, [wv, l2v, Xv, yv], [g], part)
            args = (w0, l2, X, y)
        elif part == "hvp":
            hv, _ = M.symbolic_hvp(net, wv, Xv, yv, l2v, vv)
            make_dev, make_host = _pair(theano, fncache, [wv, l2v, Xv, yv, vv], [hv], part)
            args = (w0, l2, X, y, v)
        elif part == "step":
            make_dev, make_host = _step_pair(theano, M, net, w0)
            args = (X, y)
        else:
            raise ValueError(f"unknown devcheck part {part!r}; parts: {', '.join(PARTS)}")
        dev, out["compile_s"][part] = _timed(make_dev)
        host, out["host_compile_s"][part] = _timed(make_host)
        a, b = dev(*args), host(*args)
        if part == "step":   # compare the updated weights (the functions updated their own state)
            a, b = [dev.w_after()], [host.w_after()]
        out["rel_diff"][part] = max(rel_diff(np.asarray(p), np.asarray(q)) for p, q in zip(a, b))
        fn = getattr(dev, "fn_", dev)
        out["host_ops"][part] = hostops.summary(fn)
        out["unexpected_host_ops"][part] = sorted({h.text for h in hostops.unexpected(fn)})
    out["ok"] = all(d <= out["target"] for d in out["rel_diff"].values()) and \
        not any(out["unexpected_host_ops"].values())
    return out


class _Step:
    """A compiled SGD step with its own state, and ``w_after()`` (the weights it left)."""

    def __init__(self, fn, state):
        self.fn_, self.state = fn, state

    def __call__(self, X, y):
        return self.fn_(X, y)

    def w_after(self):
        return np.asarray(self.state.w.get_value())


def _step_pair(theano, M, net, w0):
    """Makers of one Nesterov SGD step on the device (``models.compile_sgd_step``) and of the
    same step on the C backend with host copies of the state."""
    def make(host):
        state = M.SGDState(net, w0, lr=0.05, l2=1e-4, host=host)
        mode = _c_mode(theano) if host else None
        return _Step(M.compile_sgd_step(state, 0.9, nesterov=True, mode=mode), state)
    return (lambda: make(False)), (lambda: make(True))


def print_table(res) -> None:
    print(f"gpu_ver on {res['device']} ({res['floatX']}) vs Theano's C backend, "
          f"DenseNet depth {res['net'].get('depth')} growth {res['net'].get('growth')}")
    print(f"{'part':<6} {'rel diff':>10} {'target':>8} {'compile s':>10}  host ops  (compile s: the device function)")
    for part, d in res["rel_diff"].items():
        print(f"{part:<6} {d:>10.3e} {res['target']:>8.0e} {res['compile_s'][part]:>10.1f}  "
              f"{res['host_ops'][part] or 'none'}")
    bad = {p: u for p, u in res["unexpected_host_ops"].items() if u}
    if bad:
        print("unexpected host ops:", bad)


def add_devcheck_arguments(p):
    p.add_argument("--depth", type=int, default=7)
    p.add_argument("--growth", type=int, default=4)
    p.add_argument("--image-size", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")


def run_devcheck(args) -> int:
    from gpu_ver import config  # noqa: PLC0415
    from shared import records  # noqa: PLC0415
    from shared.errors import ConfigError  # noqa: PLC0415
    theano = config.load()
    parts = tuple(p for p in args.parts.split(",") if p)
    bad = [p for p in parts if p not in PARTS] or ([] if parts else ["(none)"])
    if bad:
        raise ConfigError(f"--parts: unknown part(s) {', '.join(bad)}; choose from {', '.join(PARTS)}")
    for name in ("depth", "growth", "image_size", "batch"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if not config.on_gpu(theano):
        raise ConfigError("devcheck compares a GPU device with the C backend: give --device cuda or "
                          "--device opencl (scripts/opencl_setup.sh installs an OpenCL device on the CPU)")
    t = time.perf_counter()
    res = check(args.depth, args.growth, args.image_size, args.batch, seed=args.seed, parts=parts)
    print_table(res)
    from gpu_ver.__main__ import argv_record, out_dir  # noqa: PLC0415
    records.write_results(out_dir(args), argv_record(args), vars_config(args), res,
                          {"total_s": round(time.perf_counter() - t, 1)})
    return 0 if res["ok"] else 1


def vars_config(args) -> dict:
    return {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "out"}
