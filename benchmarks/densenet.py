"""DenseNet in Theano (gpu_ver) against the same network in PyTorch, on this machine, in one run.

Measures, for a DenseNet (default DenseNet-40, k = 12, float32, batch 64,
32x32 inputs) on the CPU:

- ``compile_train_cold_s``: compiling the SGD training step (gradient +
  Nesterov update + BN running averages) with an empty, temporary Theano
  compile cache (a fresh process);
- ``compile_train_cached_s``: the same in a second process with that cache
  warm (graph optimisation still runs; C modules are reused);
- ``compile_reverse_<m>_cold_s``: the function of DrMAD's and the exact
  reversal's reverse step at w_t (gradient, Hessian-vector product and the
  hyperparameter VJP 2 w v, ``gpu_ver.models.symbolic_grad_and_hvp``) for each
  HVP method m: ``ror`` (reverse over reverse) and ``rop`` (forward over
  reverse, the R-operator), each with its own empty cache;
  ``reverse_<m>_step_s`` is its run time per batch and
  ``reverse_<m>_over_train_step`` its ratio to the training step measured in
  the same run (target <= 2.5);
- ``theano_step_s`` / ``torch_step_s``: median wall time of one training step
  (forward, backward, update); ``theano_over_torch`` is their ratio.

PyTorch is not a dependency of this project: it is imported only by this
script's torch worker, which runs under ``--torch-python`` (default
``$HPO_BENCH_TORCH_PYTHON``, else ``.venv-bench/bin/python`` when it exists,
else this interpreter). To make one, outside the project's environment:

    python3.11 -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0

(the torch worker needs nothing else). When torch is missing the torch
figures are ``null`` and the script says how to install it.

Usage:  python benchmarks/densenet.py [--quick] [--json FILE] [--no-reverse]
        [--hvp ror,rop] [--openmp] [--dynamic-batch]
        [--depth 40 --growth 12 --batch 64 --steps 5]

``--quick``: DenseNet-10, batch 32, 3 steps (a few minutes here, nearly all
of it the cold compiles). Every worker runs in its own process so that each
gets its own Theano flags (cache folder, openmp).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALL_HINT = ("torch not found: python3.11 -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0 "
                "(then rerun, or pass --torch-python)")


# --------------------------------------------------------------------------- workers
def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _peak_rss_bytes():
    import resource  # noqa: PLC0415

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker_theano(a) -> dict:
    """Compile (and run) the training step or the HVP function; flags come from the environment."""
    sys.path.insert(0, str(ROOT))
    from gpu_ver import config  # noqa: PLC0415

    theano = config.load(device=os.environ.get("HPO_DEVICE") or "cpu", floatX="float32")
    import numpy as np  # noqa: PLC0415

    from gpu_ver import models as M  # noqa: PLC0415

    net = M.DenseNet(a.depth, a.growth, input_shape=(3, a.size, a.size),
                     batch_size=a.batch if a.static_batch else None, conv=a.conv)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((a.batch, 3, a.size, a.size)).astype("float32")
    y = rng.integers(0, 10, a.batch).astype("int64")
    out = {"n_params": net.layout.size, "openmp": bool(theano.config.openmp),
           "blas_ldflags": theano.config.blas__ldflags}
    if a.worker == "train":
        state = M.SGDState(net, net.init(0), lr=0.1, l2=5e-5)
        t = time.perf_counter()
        step = M.compile_sgd_step(state, 0.9, nesterov=True)
        out["compile_s"] = time.perf_counter() - t
        fn = lambda: step(X, y)  # noqa: E731
    else:
        tt = M.tt
        w, l2, v = tt.vector("w"), tt.vector("l2"), tt.vector("v")
        Xs, ys = net.input_var("X"), tt.lvector("y")
        t = time.perf_counter()
        f = theano.function([w, l2, Xs, ys, v], list(M.symbolic_grad_and_hvp(net, w, Xs, ys, l2, v, a.hvp)))
        out["compile_s"] = time.perf_counter() - t
        w0 = net.init(0).astype("float32")
        lv = np.full(w0.size, 5e-5, "float32")
        vv = rng.standard_normal(w0.size).astype("float32")
        fn = lambda: f(w0, lv, X, y, vv)  # noqa: E731
    times = []
    for _ in range(a.steps + 1):          # the first call is a warm-up
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    out["step_s"] = _median(times[1:]) if a.steps else None
    out["images_per_s"] = a.batch / out["step_s"] if out["step_s"] else None
    out["device"] = str(theano.config.device)
    out["peak_rss_bytes"] = _peak_rss_bytes()
    return out


def worker_torch(a) -> dict:
    """The same DenseNet and SGD step in PyTorch (CPU, all cores)."""
    try:
        import torch  # noqa: PLC0415
        from torch import nn  # noqa: PLC0415
    except ImportError:
        return {"error": INSTALL_HINT}
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)

    def bn_relu_conv(cin, cout, k):
        return nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, k, padding=k // 2, bias=False))

    class Layer(nn.Module):
        def __init__(self, cin, k):
            super().__init__()
            self.f = bn_relu_conv(cin, k, 3)

        def forward(self, x):
            return torch.cat([x, self.f(x)], 1)

    n, k, c = (a.depth - 4) // 3, a.growth, 16
    mods = [nn.Conv2d(3, c, 3, padding=1, bias=False)]
    for b in range(3):
        for _ in range(n):
            mods.append(Layer(c, k))
            c += k
        if b < 2:
            mods += [bn_relu_conv(c, c, 1), nn.AvgPool2d(2)]
    mods += [nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]
    net = nn.Sequential(*mods)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    X = torch.randn(a.batch, 3, a.size, a.size)
    y = torch.randint(0, 10, (a.batch,))
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for _ in range(a.steps + 1):
        t = time.perf_counter()
        opt.zero_grad()
        loss_fn(net(X), y).backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return {"step_s": _median(times[1:]), "torch_version": torch.__version__, "threads": torch.get_num_threads(),
            "n_params": sum(p.numel() for p in net.parameters()), "peak_rss_bytes": _peak_rss_bytes()}


# --------------------------------------------------------------------------- driver
def _spawn(python, args, env=None, timeout=3600):
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    r = subprocess.run([python, __file__, *args], env=e, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return {"error": f"worker {args[1]} failed (exit {r.returncode}): {' | '.join(tail)}"}
    return json.loads(lines[-1])


def _torch_python(opt):
    if opt:
        return opt
    if os.environ.get("HPO_BENCH_TORCH_PYTHON"):
        return os.environ["HPO_BENCH_TORCH_PYTHON"]
    local = ROOT / ".venv-bench" / "bin" / "python"
    return str(local) if local.exists() else sys.executable


def run(a) -> dict:
    common = ["--depth", str(a.depth), "--growth", str(a.growth), "--batch", str(a.batch),
              "--size", str(a.size), "--conv", a.conv] + ([] if a.static_batch else ["--dynamic-batch"])
    env = {"HPO_OPENMP": "1" if a.openmp else "0", "HPO_DEVICE": os.environ.get("HPO_DEVICE") or "cpu",
           "HPO_FLOATX": "float32"}
    res = {"depth": a.depth, "growth": a.growth, "batch": a.batch, "size": a.size, "steps": a.steps,
           "floatX": "float32", "conv": a.conv, "openmp": a.openmp, "static_batch": a.static_batch, "cpu_count": os.cpu_count(),
           "load_average_start": os.getloadavg()[0]}
    tmp = Path(tempfile.mkdtemp(prefix="densenet-bench-"))
    try:
        cache = {**env, "HPO_THEANO_CACHE": str(tmp / "cache-train")}
        print(f"[1/4] Theano training step, cold cache ({tmp})", file=sys.stderr, flush=True)
        cold = _spawn(sys.executable, ["--worker", "train", *common, "--steps", str(a.steps)], cache)
        print("[2/4] Theano training step, warm cache", file=sys.stderr, flush=True)
        warm = _spawn(sys.executable, ["--worker", "train", *common, "--steps", "0"], cache)
        rev = {}
        for m in (a.hvp_methods if a.reverse else ()):
            print(f"[3/4] Theano reverse step (gradient + HVP {m} + hyper-VJP), cold cache", file=sys.stderr,
                  flush=True)
            rev[m] = _spawn(sys.executable, ["--worker", "reverse", *common, "--hvp", m, "--steps",
                                             str(a.reverse_steps)], {**env, "HPO_THEANO_CACHE": str(tmp / f"cache-{m}")})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("[4/4] PyTorch training step", file=sys.stderr, flush=True)
    tp = _torch_python(a.torch_python)
    tor = _spawn(tp, ["--worker", "torch", *common, "--steps", str(a.steps)])
    for name, d in (("train_cold", cold), ("train_cached", warm), ("torch", tor),
                    *((f"reverse_{m}", d) for m, d in rev.items())):
        if "error" in d:
            res[f"{name}_error"] = d["error"]
    res.update({
        "compile_train_cold_s": cold.get("compile_s"),
        "compile_train_cached_s": warm.get("compile_s"),
        "theano_step_s": cold.get("step_s"),
        "torch_step_s": tor.get("step_s"),
        "n_params": cold.get("n_params"),
        "torch_n_params": tor.get("n_params"),
        "torch_version": tor.get("torch_version"),
        "torch_threads": tor.get("threads"),
        "theano_peak_rss_bytes": cold.get("peak_rss_bytes"),
        "blas_ldflags": cold.get("blas_ldflags"),
        "load_average_end": os.getloadavg()[0],
    })
    ts, to = res["theano_step_s"], res["torch_step_s"]
    res["theano_over_torch"] = ts / to if ts and to else None
    for m, d in rev.items():
        rs = d.get("step_s")
        res[f"compile_reverse_{m}_cold_s"] = d.get("compile_s")
        res[f"reverse_{m}_step_s"] = rs
        res[f"reverse_{m}_over_train_step"] = rs / ts if rs and ts else None
        res[f"reverse_{m}_peak_rss_bytes"] = d.get("peak_rss_bytes")
    return res


def table(res) -> str:
    rows = [("network", f"DenseNet-{res['depth']} k={res['growth']}, batch {res['batch']}, "
                        f"{res['size']}x{res['size']}, float32, {res['cpu_count']} cores")]
    rev = [k for k in res if k.startswith(("compile_reverse_", "reverse_")) and not k.endswith(("_error", "_bytes"))]
    for k in ("compile_train_cold_s", "compile_train_cached_s", "theano_step_s", "torch_step_s",
              "theano_over_torch", *rev):
        v = res.get(k)
        rows.append((k, "n/a" if v is None else f"{v:.3f}"))
    rows += [(k, str(v)) for k, v in res.items() if k.endswith("_error")]
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="DenseNet-10, batch 32, 3 steps")
    p.add_argument("--device", default=None, choices=("cpu", "cuda", "opencl"),
                   help="Theano device for the Theano workers (default $HPO_DEVICE, else cpu)")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--growth", type=int, default=12)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--conv", default="gemm", choices=("gemm", "corrmm"),
                   help="DenseNet convolution: gemm (default: channel-major, one product per layer) or corrmm "
                        "(Theano's conv2d)")
    p.add_argument("--openmp", action="store_true", help="Theano openmp=True (CorrMM parallel over the batch)")
    p.add_argument("--dynamic-batch", dest="static_batch", action="store_false",
                   help="leave the batch size out of conv2d's static shapes (much slower to compile)")
    p.add_argument("--no-reverse", dest="reverse", action="store_false", help="skip the reverse-step compiles")
    p.add_argument("--hvp", default="ror,rop",
                   help="comma-separated HVP methods of the reverse step to measure (ror, rop; default both)")
    p.add_argument("--reverse-steps", type=int, default=None,
                   help="timed calls of each reverse step (default: --steps)")
    p.add_argument("--torch-python", default=None, help="interpreter with torch installed")
    p.add_argument("--worker", choices=["train", "reverse", "torch"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.hvp_methods = [m for m in a.hvp.split(",") if m]
    if (not a.hvp_methods or any(m not in ("ror", "rop") for m in a.hvp_methods)):
        p.exit(2, f"error: --hvp must be a comma-separated list of ror, rop, got {a.hvp!r}\n")
    a.depth = a.depth or (10 if a.quick else 40)
    a.batch = a.batch or (32 if a.quick else 64)
    a.steps = 3 if a.steps is None and a.quick else (5 if a.steps is None else a.steps)
    a.reverse_steps = a.steps if a.reverse_steps is None else a.reverse_steps
    if a.device:
        os.environ["HPO_DEVICE"] = a.device      # read by the worker processes
    if a.worker:
        print(json.dumps(worker_torch(a) if a.worker == "torch" else worker_theano(a)))
        return 0
    res = run(a)
    print(table(res))
    if "torch_error" in res:
        print(INSTALL_HINT, file=sys.stderr)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
