"""The pygpu/Theano smoke test of the GPU bundle (``gpu_report.py smoke``, run by the bundled
Python 3.11): low-level pygpu diagnostics, then a small convolution and its gradients on the
device against a float64 numpy reference, printing ``figure`` lines the report parses.
"""
from __future__ import annotations

import json
import os
import time

def _rel(out, ref) -> float:
    import numpy as np
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        return float("nan")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-300))


def conv_reference(x, w, g):
    """float64 reference of y = conv2d(x, w, 'half', filter_flip=True) and the gradients of sum(y * g)."""
    import numpy as np
    x, w, g = (np.asarray(t, dtype=np.float64) for t in (x, w, g))
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    ph, pw = kh // 2, kw // 2
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    wf = w[:, :, ::-1, ::-1]  # true convolution flips the kernel
    y = np.zeros((n, o, h, wd))
    gxp = np.zeros_like(xp)
    gwf = np.zeros_like(wf)
    for i in range(kh):
        for j in range(kw):
            xs = xp[:, :, i:i + h, j:j + wd]
            y += np.einsum("nchw,oc->nohw", xs, wf[:, :, i, j], optimize=True)
            gwf[:, :, i, j] = np.einsum("nohw,nchw->oc", g, xs, optimize=True)
            gxp[:, :, i:i + h, j:j + wd] += np.einsum("nohw,oc->nchw", g, wf[:, :, i, j], optimize=True)
    return y, gxp[:, :, ph:ph + h, pw:pw + wd], gwf[:, :, ::-1, ::-1]


def low_level_diagnostics(device: str) -> dict:
    """What the loader and pygpu say, before Theano: dlopen of the unversioned CUDA names, pygpu.init."""
    import ctypes
    d = {}
    for lib in ("libcuda.so", "libnvrtc.so", "libcublas.so", "libgpuarray.so.3"):
        try:
            ctypes.CDLL(lib)
            d[f"dlopen {lib}"] = "ok"
        except OSError as e:
            d[f"dlopen {lib}"] = f"FAIL {e}"
    try:
        import pygpu
        d["pygpu"] = f"{getattr(pygpu, '__version__', '?')} at {os.path.dirname(pygpu.__file__)}"
        if device == "cuda":
            import pygpu.gpuarray as ga
            d["pygpu cuda devices"] = int(ga.count_devices("cuda", 0))
            ctx = pygpu.init("cuda0")
            d["pygpu.init cuda0"] = f"ok: {ctx.devname} {ctx.bin_id}"
            del ctx
    except Exception as e:
        d["pygpu error"] = f"{type(e).__name__}: {e}"
    return d


def cmd_smoke(a) -> int:
    import numpy as np
    res = {"device_requested": a.device}
    ok = True
    t0 = time.time()
    res["diagnostics"] = low_level_diagnostics(a.device)
    for k, v in res["diagnostics"].items():
        print(f"diag {k}: {v}", flush=True)
    try:
        try:
            from gpu_ver import config as hcfg
            theano = hcfg.load(device=a.device, floatX="float32")
            res["flags_via"] = "gpu_ver.config.load"
        except ImportError as e:  # gpu_ver.config not importable: set the flags here
            res["flags_via"] = f"THEANO_FLAGS (gpu_ver.config: {e})"
            dev = "cuda" if a.device == "cuda" else "cpu"
            extra = ",dnn__enabled=False" if dev == "cuda" else ""
            os.environ["THEANO_FLAGS"] = (os.environ.get("THEANO_FLAGS", "") +
                                          f",device={dev},floatX=float32,blas__ldflags={extra}").strip(",")
            import theano
        import theano.tensor as T
        from theano.tensor.nnet import conv2d
    except Exception as e:
        res.update(passed=False, error=f"{type(e).__name__}: {e}")
        print(json.dumps({"smoke": res}))
        print(f"FAIL import: {type(e).__name__}: {e}")
        return 1
    res["import_s"] = round(time.time() - t0, 1)
    res["device"] = str(theano.config.device)
    res["theano_flags"] = os.environ.get("THEANO_FLAGS", "")
    if str(theano.config.device).startswith("cuda"):
        try:
            from theano.gpuarray.type import get_context
            ctx = get_context(None)
            res["devname"] = ctx.devname
            res["bin_id"] = ctx.bin_id
            res["total_gmem_gib"] = round(ctx.total_gmem / 2 ** 30, 1)
            print(f"PASS pygpu context: {ctx.devname} {ctx.bin_id}")
        except Exception as e:
            res["context_error"] = f"{type(e).__name__}: {e}"
            ok = False
            print(f"FAIL pygpu context: {res['context_error']}")
    rng = np.random.default_rng(int(time.time()) % 100000)

    def timed(f, args, n):
        f(*args)
        t = time.time()
        for _ in range(n):
            f(*args)
        return (time.time() - t) / n * 1e3

    try:  # gemm
        A, B = T.fmatrix("A"), T.fmatrix("B")
        tc = time.time()
        f = theano.function([A, B], T.dot(A, B))
        res["gemm_compile_s"] = round(time.time() - tc, 1)
        Av = rng.standard_normal((1024, 1024)).astype("float32")
        Bv = rng.standard_normal((1024, 1024)).astype("float32")
        res["gemm_rel_err"] = _rel(f(Av, Bv), Av.astype(np.float64) @ Bv.astype(np.float64))
        res["gemm_ms"] = round(timed(f, (Av, Bv), 10), 3)
        res["gemm_ops"] = sorted({type(n.op).__name__ for n in f.maker.fgraph.toposort()})
        g_ok = res["gemm_rel_err"] < 1e-4
        ok &= g_ok
        print(("PASS" if g_ok else "FAIL") + f" gemm 1024: rel err {res['gemm_rel_err']:.2e}, "
              f"{res['gemm_ms']} ms incl. transfers, ops {res['gemm_ops']}")
    except Exception as e:
        ok = False
        res["gemm_error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        print(f"FAIL gemm: {res['gemm_error']}")

    try:  # conv2d forward + backward with static shapes
        xs, ws = (a.batch, 12, 32, 32), (12, 12, 3, 3)
        X, W, G = T.ftensor4("X"), T.ftensor4("W"), T.ftensor4("G")
        y = conv2d(X, W, input_shape=xs, filter_shape=ws, border_mode="half")
        gx, gw = T.grad((y * G).sum(), [X, W])
        tc = time.time()
        fc = theano.function([X, W, G], [y, gx, gw])
        res["conv_compile_s"] = round(time.time() - tc, 1)
        Xv = rng.standard_normal(xs).astype("float32")
        Wv = rng.standard_normal(ws).astype("float32")
        Gv = rng.standard_normal((xs[0], ws[0], 32, 32)).astype("float32")
        outs = fc(Xv, Wv, Gv)
        refs = conv_reference(Xv, Wv, Gv)
        errs = [_rel(o, r) for o, r in zip(outs, refs)]
        res["conv_rel_err"] = max(errs)
        res["conv_rel_errs_y_gx_gw"] = errs
        res["conv_ms"] = round(timed(fc, (Xv, Wv, Gv), 10), 3)
        res["conv_ops"] = sorted({type(n.op).__name__ for n in fc.maker.fgraph.toposort()})
        c_ok = res["conv_rel_err"] < 1e-4
        ok &= c_ok
        print(("PASS" if c_ok else "FAIL") + f" conv2d fwd+bwd {xs}: rel errs {[f'{e:.1e}' for e in errs]}, "
              f"{res['conv_ms']} ms incl. transfers, ops {res['conv_ops']}")
    except Exception as e:
        ok = False
        res["conv_error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        print(f"FAIL conv2d: {res['conv_error']}")
    if a.device == "cuda" and not str(theano.config.device).startswith("cuda"):
        ok = False
    gpu_ops = [o for o in res.get("gemm_ops", []) + res.get("conv_ops", []) if o.startswith("Gpu")]
    res["gpu_ops_used"] = bool(gpu_ops)
    if a.device == "cuda" and not gpu_ops:
        ok = False
        print("FAIL no Gpu* op in the compiled graphs")
    res["passed"] = bool(ok)
    res["seconds"] = round(time.time() - t0, 1)
    print(json.dumps({"smoke": res}, default=str))
    return 0 if ok else 1
