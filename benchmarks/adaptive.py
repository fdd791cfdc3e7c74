"""Online methods (cpu_ver/online/): step overhead, HD on MNIST, IDBD's optimum.

Parts (default: all):

--overhead  MLP 784-1000-1000-10, batch 128 (gradient-dominated). Every method
            keeps its own weights and state; in each round every method runs a
            block of ``--block`` steps (10, so that T1-T2 with one hyper step per
            10 weight steps takes exactly one hyper step per block) in turn,
            interleaved with the plain SGD block; the ratio per round is the
            method's mean step time over plain SGD's in the same round, and the
            reported ``overhead`` is the median over rounds. Every method gets
            its gradient from the same ``model.grad`` (``online.step``).
            Targets: hd <= 1.05, idbd <= 1.15, t1t2 (every 10) <= 1.3; smd reported.
--hd-mnist  Logistic regression 784-10, alpha_0 = 1e-3, beta = 1e-3, batch 128,
            plain SGD vs SGD-HD (Baydin et al. 2018), three seeds, as many
            iterations as the published 10 epochs of 60k images (4,690). Data:
            the real MNIST t10k digits in ../shared/data/mnist (split by
            shared.datasets.load_mnist_test_only: 2,000 validation, 6,000
            training, per seed) when present, digits otherwise. Training loss:
            full training-split cross-entropy every 10 steps. Reports
            ``steps_to_sgd_final_fraction``: the first logged step where SGD-HD's
            loss <= plain SGD's final loss, over the number of steps (target <= 1/3).
--update-costs  The update that follows each gradient (caches as a training loop
            leaves them), median ms: plain SGD's ``w - lr g``, IDBD's, and IDBD's
            memory floor (its kernel's array traffic with e^x replaced by 1 + x),
            with the overhead each implies over the same gradient.
--idbd      IDBD on random-walk tracking with known optimal step (Kalman gain);
            writes idbd_tracking.png beside --json (or in the current folder).

--quick finishes in about a minute; --json FILE writes the figures.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import idbd_tracking as tracking  # noqa: E402
from cpu_ver import online as ad  # noqa: E402
from cpu_ver.models import MLP  # noqa: E402

MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"


# ---------------------------------------------------------------------------
# Overhead

OVERHEAD_METHODS = {
    "hd": ("hd", dict(lr=1e-3, beta=1e-3, granularity="global")),
    "idbd": ("idbd", dict(lr=1e-3, theta=1e-2, trace_decay=1.0)),
    "idbd_decay0.99": ("idbd", dict(lr=1e-3, theta=1e-2, trace_decay=0.99)),
    "t1t2_every10": ("t1t2", dict(lr=1e-3, l2_init=1e-4, l2_groups="block", meta_lr=1e-2, every=10)),
    "smd": ("smd", dict(lr=1e-3, mu=1e-2, lam=0.99)),
}


def overhead(rounds=8, block=10, sizes=(784, 1000, 1000, 10), batch=128, seed=0, smd_block=3, methods=None):
    rng = np.random.default_rng(seed)
    model = MLP(sizes, "tanh")
    n = 4 * batch
    if sizes[0] == 784 and (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        ds = _mnist_data(seed)          # real digits, so that the learning rates behave
        X, y, Xv, yv = ds.train.X[:n], ds.train.y[:n], ds.val.X[:n], ds.val.y[:n]
    else:                               # a learnable synthetic stand-in (same cost)
        teacher = rng.standard_normal((sizes[0], sizes[-1]))
        X, Xv = rng.random((n, sizes[0])), rng.random((n, sizes[0]))
        y, yv = np.argmax((X - 0.5) @ teacher, 1), np.argmax((Xv - 0.5) @ teacher, 1)
    w0 = model.init(seed)
    names = ["sgd"] + list(methods or OVERHEAD_METHODS)
    built = {"sgd": ad.make_method("sgd", model.layout, lr=1e-3)}
    for k in names[1:]:
        m, kw = OVERHEAD_METHODS[k]
        built[k] = ad.make_method(m, model.layout, **kw)
    chains = {k: (w0, built[k].init(w0), 0) for k in names}

    def run_block(k, steps):
        w, st, t = chains[k]
        m = built[k]
        times = []
        for _ in range(steps):
            i = slice((t % 4) * batch, (t % 4 + 1) * batch)
            t0 = time.perf_counter()
            w, st = ad.step(m, model, w, st, (X[i], y[i]), (Xv[i], yv[i]) if m.needs_val else None)
            times.append(time.perf_counter() - t0)
            t += 1
        chains[k] = (w, st, t)
        return np.array(times)

    def stat(k, times):
        # T1-T2 takes its hyper step once per block: the mean covers it. The others:
        # the median step, robust to other processes on the machine.
        return float(np.mean(times) if built[k].needs_val else np.median(times))

    for k in names:                      # warm-up (allocations, caches)
        run_block(k, 2)
    ratios = {k: [] for k in names[1:]}
    step_times = {k: [] for k in names}
    for r in range(rounds):
        line = []
        for k in names[1:]:
            # plain, method, plain: the method is compared with the plain blocks around it
            nb = smd_block if k == "smd" else block
            p1 = run_block("sgd", nb)
            tk = run_block(k, nb)
            p2 = run_block("sgd", nb)
            plain_t = (stat(k, p1) + stat(k, p2)) / 2
            ratios[k].append(stat(k, tk) / plain_t)
            step_times[k].append(stat(k, tk))
            step_times["sgd"].append(plain_t)
            line.append(f"{k} {ratios[k][-1]:.3f}")
        print(f"  round {r + 1}/{rounds}: " + ", ".join(line), flush=True)
    return {
        "overhead": {k: float(np.median(v)) for k, v in ratios.items()},
        "overhead_rounds": ratios,
        "step_time_s": {k: float(np.median(v)) for k, v in step_times.items()},
        "config": {"sizes": list(sizes), "batch": batch, "rounds": rounds, "block": block,
                   "n_params": model.layout.size, "methods": {k: OVERHEAD_METHODS[k] for k in names[1:]}},
    }


# ---------------------------------------------------------------------------
# Where IDBD's overhead goes: the update after a gradient, and its memory floor

def _floor_kernel():
    import numba

    @numba.njit(nogil=True, fastmath={"contract"})
    def floor(g, h, b, w, theta, w_new, b_new, h_new):
        """IDBD's kernel's array traffic (read g, h, b, w; write three new arrays, one
        pass) with e^x replaced by 1 + x: what the update costs at least."""
        for i in range(g.shape[0]):
            bi = b[i] - theta * (g[i] * h[i])
            b_new[i] = bi
            w_new[i] = w[i] - (1.0 + bi) * g[i]
            h_new[i] = h[i] - (1.0 + bi) * g[i]
    return floor


def update_costs(rounds=12, steps=8, sizes=(784, 1000, 1000, 10), batch=128, seed=0):
    """Median time of the update that follows each gradient (caches as a training loop
    leaves them) for plain SGD, IDBD (``adaptive.idbd``) and IDBD's memory floor, with the
    overhead ratio each implies: (gradient + update) / (gradient + SGD's update)."""
    model = MLP(sizes, "tanh")
    ds = _mnist_data(seed) if sizes[0] == 784 else None
    rng = np.random.default_rng(seed)
    X = ds.train.X[:4 * batch] if ds is not None else rng.random((4 * batch, sizes[0]))
    y = ds.train.y[:4 * batch] if ds is not None else rng.integers(0, sizes[-1], 4 * batch)
    w = model.init(seed)
    floor = _floor_kernel()
    idbd = ad.make_method("idbd", model.layout, lr=1e-3, theta=1e-2, trace_decay=1.0)
    state = {"idbd": idbd.init(w), "floor": (np.full(w.size, np.log(1e-3)), np.zeros(w.size))}
    times = {k: [] for k in ("grad", "sgd", "idbd", "floor")}
    for r in range(rounds):
        for k in ("sgd", "idbd", "floor"):
            for t in range(steps):
                i = slice((t % 4) * batch, (t % 4 + 1) * batch)
                t0 = time.perf_counter()
                g = model.grad(w, 0.0, X[i], y[i])
                t1 = time.perf_counter()
                if k == "sgd":
                    w_new = w - 1e-3 * g
                elif k == "idbd":
                    w_new, state[k] = idbd.update(ad.GradInfo(g, None, None), state[k], w)
                else:
                    b, h = state[k]
                    w_new, b_new, h_new = np.empty_like(w), np.empty_like(w), np.empty_like(w)
                    floor(g, h, b, w, 1e-2, w_new, b_new, h_new)
                    state[k] = (b_new, h_new)
                t2 = time.perf_counter()
                del w_new               # every chain trains from the same w: same gradient cost
                if r > 0:               # round 0: compiles, first allocations
                    times["grad"].append(t1 - t0)
                    times[k].append(t2 - t1)
    ms = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    implied = {k: (ms["grad"] + ms[k]) / (ms["grad"] + ms["sgd"]) for k in ("idbd", "floor")}
    return {"median_ms": ms, "implied_overhead": implied, "rounds": rounds, "steps": steps}


# ---------------------------------------------------------------------------
# HD on MNIST logistic regression

def _mnist_data(seed):
    from shared.datasets import load

    if (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        ds = load("mnist-t10k", data_dir=str(MNIST_DIR), seed=seed)
    else:
        ds = load("digits", seed=seed)
    return ds


def hd_mnist(seeds=(0, 1, 2), steps=4690, alpha0=1e-3, beta=1e-3, batch=128, eval_every=10):
    out = {"seeds": list(seeds), "steps": steps, "alpha0": alpha0, "beta": beta, "batch": batch, "runs": []}
    fracs = []
    for seed in seeds:
        ds = _mnist_data(seed)
        X, y, Xv, yv = ds.train.X, ds.train.y, ds.val.X, ds.val.y
        model = MLP((X.shape[1], ds.n_classes), "tanh")
        res = {}
        for name, kw in (("sgd", dict(lr=alpha0)), ("hd", dict(lr=alpha0, beta=beta, granularity="global"))):
            m = ad.make_method(name, model.layout, **kw)
            curves, _, st = ad.train_online(m, model, (X, y, Xv, yv), steps, batch, seed, eval_every,
                                            record_hypers=(name == "hd"), progress=False)
            res[name] = curves
        sgd_final = res["sgd"]["train_loss"][-1]
        hd_loss = np.array(res["hd"]["train_loss"])
        hit = np.nonzero(hd_loss <= sgd_final)[0]
        first = int(res["hd"]["step"][hit[0]]) if len(hit) else None
        frac = (first / steps) if first is not None else float("inf")
        fracs.append(frac)
        alpha = [q[0][2] for q in res["hd"]["lr_quantiles"]]
        out["runs"].append({"seed": seed, "dataset": ds.name, "n_train": len(y), "sgd_final_train_loss": sgd_final,
                            "hd_final_train_loss": float(hd_loss[-1]), "hd_steps_to_sgd_final": first,
                            "fraction": frac, "hd_final_alpha": alpha[-1],
                            "curves": {"step": res["sgd"]["step"], "sgd": res["sgd"]["train_loss"],
                                       "hd": res["hd"]["train_loss"], "hd_alpha": alpha}})
        print(f"  seed {seed} ({ds.name}, n_train {len(y)}): SGD final {sgd_final:.4f}, SGD-HD final "
              f"{hd_loss[-1]:.4f}, SGD-HD reaches SGD's final loss at step {first} of {steps} "
              f"({frac:.3f}); alpha_T {alpha[-1]:.4g}", flush=True)
    out["steps_to_sgd_final_fraction"] = fracs
    out["max_fraction"] = float(max(fracs))
    return out


# ---------------------------------------------------------------------------
# IDBD on the tracking task

def idbd_part(steps=30000, n_rep=20, theta=2e-2, q=(1e-3, 1e-2, 1e-1), r=1.0, fig_path=None):
    q = np.asarray(q)
    K = tracking.kalman_optimal_step(q, r)
    out = {"q": q.tolist(), "r": r, "theta": theta, "steps": steps, "n_rep": n_rep, "kalman_gain": K.tolist()}
    traj = {}
    for a0 in (0.5, 0.005):
        ts, A = tracking.idbd_tracking(q, r, theta, steps, n_rep, alpha0=a0, seed=0)
        late = A[len(A) // 2:]
        geo = np.exp(np.log(late).mean(axis=(0, 2)))
        out[f"alpha0={a0}"] = {"alpha_late_geomean": geo.tolist(), "ratio_to_optimum": (geo / K).tolist()}
        traj[a0] = (ts, A)
        print(f"  IDBD from alpha0={a0}: late alpha {np.round(geo, 4).tolist()} vs optimum "
              f"{np.round(K, 4).tolist()} (ratio {np.round(geo / K, 3).tolist()})", flush=True)
    if fig_path is not None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from shared.records import save_figure
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        for j, qq in enumerate(q):
            for a0, (ts, A) in traj.items():
                ax[0].plot(ts, np.exp(np.log(A[:, j, :]).mean(axis=1)), color=f"C{j}",
                           ls="-" if a0 > 0.1 else ":", label=f"q={qq:g}" if a0 > 0.1 else None)
            ax[0].axhline(K[j], color=f"C{j}", lw=0.8, ls="--")
        ax[0].set_yscale("log")
        ax[0].set_xlabel("step")
        ax[0].set_ylabel("IDBD step size (geo. mean over units)")
        ax[0].set_title("IDBD (solid: from 0.5, dotted: from 0.005); dashed: optimum")
        ax[0].legend()
        a = np.logspace(-3, np.log10(0.9), 400)
        for j, qq in enumerate(q):
            ax[1].plot(a, tracking.tracking_mse(a, qq, r), color=f"C{j}", label=f"q={qq:g}")
            ax[1].axvline(K[j], color=f"C{j}", ls="--", lw=0.8)
        ax[1].set_xscale("log")
        ax[1].set_yscale("log")
        ax[1].set_xlabel("step size alpha")
        ax[1].set_ylabel("steady-state prediction MSE")
        ax[1].legend()
        fig.tight_layout()
        save_figure(fig, fig_path)
        out["figure"] = str(fig_path)
    return out


# ---------------------------------------------------------------------------

TARGETS = {"hd": 1.05, "idbd": 1.15, "t1t2_every10": 1.3}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="about a minute")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    p.add_argument("--overhead", action="store_true")
    p.add_argument("--hd-mnist", action="store_true")
    p.add_argument("--idbd", action="store_true")
    p.add_argument("--update-costs", action="store_true",
                   help="IDBD's update after a gradient vs plain SGD's, and its memory floor")
    p.add_argument("--rounds", type=int, default=None)
    args = p.parse_args(argv)
    parts = ([k for k in ("overhead", "update_costs", "hd_mnist", "idbd") if getattr(args, k)]
             or ["overhead", "update_costs", "hd_mnist", "idbd"])
    out = {"quick": args.quick}
    t_all = time.perf_counter()
    if "overhead" in parts:
        print("overhead: MLP 784-1000-1000-10, batch 128")
        rounds = args.rounds or (3 if args.quick else 10)
        r = overhead(rounds=rounds)
        out.update(r)
        print(f"{'method':<16}{'step/plain':>12}{'range':>16}{'target':>9}")
        for k, v in r["overhead"].items():
            tgt = TARGETS.get(k)
            lo, hi = min(r["overhead_rounds"][k]), max(r["overhead_rounds"][k])
            print(f"{k:<16}{v:>12.3f}{f'{lo:.3f}-{hi:.3f}':>16}{(f'{tgt:.2f}' if tgt else '-'):>9}"
                  + ("" if tgt is None else ("  ok" if v <= tgt else "  OVER")))
        print(f"plain SGD step {1e3 * r['step_time_s']['sgd']:.1f} ms")
    if "update_costs" in parts:
        print("update-costs: the update after each gradient, MLP 784-1000-1000-10, batch 128")
        r = update_costs(rounds=3 if args.quick else 12)
        out["update_costs"] = r
        m, imp = r["median_ms"], r["implied_overhead"]
        print(f"  gradient {m['grad']:.1f} ms; update: SGD {m['sgd']:.1f} ms, IDBD {m['idbd']:.1f} ms, "
              f"IDBD's memory floor (no e^x) {m['floor']:.1f} ms")
        print(f"  implied overhead: IDBD {imp['idbd']:.3f}, floor {imp['floor']:.3f}")
    if "hd_mnist" in parts:
        print("hd-mnist: logistic regression, alpha0 1e-3, beta 1e-3, batch 128")
        r = hd_mnist(seeds=(0,) if args.quick else (0, 1, 2), steps=1500 if args.quick else 4690)
        out["hd_mnist"] = r
        print(f"max fraction of steps for SGD-HD to reach SGD's final loss: {r['max_fraction']:.3f} (target <= 0.333)")
    if "idbd" in parts:
        print("idbd: random-walk tracking, optimum = steady-state Kalman gain")
        fig = (Path(args.json).resolve().parent if args.json else Path.cwd()) / "idbd_tracking.png"
        out["idbd"] = idbd_part(steps=10000 if args.quick else 30000, n_rep=10 if args.quick else 20, fig_path=fig)
    out["total_s"] = time.perf_counter() - t_all
    if args.json:
        from shared.records import write_json_atomic
        write_json_atomic(args.json, out)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
