"""``python -m gpu_ver drmad``: one DrMAD (or exact) hypergradient, a meta-optimisation
run (``gpu_ver.meta.run``), or (``--memory-steps``) the peak-memory measurement of
``benchmarks/drmad_memory.py``. The model, data and hyperparameter options are
``gpu_ver.cli.problem``'s. Theano is imported inside ``run_drmad`` only.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from gpu_ver.cli.problem import add_problem_arguments, build_problem
from shared import interrupt
from shared.cli import add_resume_argument, config_of, record_argv
from shared.errors import ConfigError
from shared.meta_opt import OPTIMIZERS, Clip


def add_drmad_arguments(p):
    add_problem_arguments(p)
    p.add_argument("--method", default="drmad", choices=("drmad", "exact"),
                   help="hypergradient of each meta-iteration: DrMAD (--K/--grid/--velocity) or exact "
                        "reversible learning (gpu_ver.reversible)")
    p.add_argument("--meta-iters", type=int, default=0, help="meta-iterations (0: one hypergradient)")
    p.add_argument("--optimizer", default="adam", choices=sorted(OPTIMIZERS))
    p.add_argument("--meta-lr", type=float, default=0.05)
    p.add_argument("--clip", type=float, default=None, help="clip the hypergradient to this norm")
    p.add_argument("--clip-value", type=float, default=None, help="clip each hypergradient entry to +-this")
    add_resume_argument(p.add_argument)
    p.add_argument("--memory-steps", default=None,
                   help="measure peak memory of DrMAD (K=1) for these T, e.g. 100,1000,10000, instead")
    p.add_argument("--no-progress", action="store_true")



def plot_history(history: dict, path, title="meta-optimisation (DrMAD)") -> None:
    import sys  # noqa: PLC0415

    import matplotlib  # noqa: PLC0415

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from shared.records import save_figure  # noqa: PLC0415

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    it = np.arange(len(history["val_loss"]))
    a.plot(it, history["train_loss"], label="train")
    a.plot(it, history["val_loss"], label="validation")
    a.set(xlabel="meta-iteration", ylabel="cross-entropy", title=title)
    a.legend()
    b.semilogy(it, np.maximum(history["hypergradient_norm"], 1e-300))
    b.set(xlabel="meta-iteration", ylabel="|hypergradient| (free coordinates)")
    from shared.plotting import integer_axis  # noqa: PLC0415

    integer_axis(a), integer_axis(b)
    fig.tight_layout()
    save_figure(fig, path)


def run_drmad(args) -> int:
    """``python -m gpu_ver drmad``: one DrMAD hypergradient, a meta-optimisation run, or
    (``--memory-steps``) the peak-memory measurement."""
    from shared import records  # noqa: PLC0415

    out = Path(args.out)          # resolved once by gpu_ver.__main__ (shared.cli.prepare_run_folder)
    if args.memory_steps:
        try:
            from benchmarks import drmad_memory  # noqa: PLC0415 (the measurement lives with the benchmarks)
        except ImportError:
            raise ConfigError("--memory-steps runs benchmarks/drmad_memory.py: run it from a checkout of the "
                              "repository (the folder that holds benchmarks/)") from None
        try:
            steps = [int(s) for s in str(args.memory_steps).split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--memory-steps must be comma-separated integers, got {args.memory_steps!r}") from None
        t0 = time.perf_counter()
        rows = drmad_memory.measure_memory(steps, layers=args.layers or "64,50,10", batch=args.batch,
                                           seed=args.seed, progress=not args.no_progress)
        drmad_memory.print_memory_table(rows)
        metrics = {"peak_memory_bytes": {str(r["T"]): r["maxrss_bytes"] for r in rows}, "rows": rows}
        records.write_results(out, record_argv("gpu_ver", args), config_of(args), metrics,
                              {"total_s": time.perf_counter() - t0})
        print(f"results: {out / records.RESULTS_FILE}")
        return 0
    t0 = time.perf_counter()
    problem, hypers, data_desc = build_problem(args)
    from gpu_ver import drmad as D  # noqa: PLC0415
    from gpu_ver import meta  # noqa: PLC0415

    if getattr(args, "method", "drmad") == "exact":
        from gpu_ver import reversible as R  # noqa: PLC0415

        engine = R.Reversible(problem, hypers, hvp=args.hvp)
    else:
        engine = D.DrMAD(problem, hypers, K=args.K, grid=args.grid, velocity=args.velocity, hvp=args.hvp)
    timings = {"setup_s": time.perf_counter() - t0 - engine.compile_s, "compile_s": engine.compile_s}
    config = {**config_of(args), "data": data_desc, "problem": problem.describe(), "floatX": D.floatX()}
    records.make_run_dir(out)
    if args.meta_iters == 0:
        t1 = time.perf_counter()
        res = engine.hypergradient(hypers, progress=not args.no_progress)
        timings["hypergradient_s"] = time.perf_counter() - t1
        timings.update({k: res.info[k] for k in ("forward_s", "reverse_s")})
        if "val_error" not in res.info:                     # the exact engine evaluates on request
            res.info["val_error"] = engine.validation(False)[1]
        grads = {k: v for k, v in res.grads.items() if k in hypers.tuned}
        free = hypers.chain(grads)
        metrics = {"val_loss": res.objective, "val_error": res.info["val_error"],
                   "hypergradient_norm": {k: float(np.linalg.norm(v)) for k, v in grads.items()},
                   "hypergradient_free_norm": {k: float(np.linalg.norm(v)) for k, v in free.items()},
                   "hypergradient": {k: v.tolist() for k, v in grads.items() if v.size <= 20000},
                   **({"K": res.info["K"], "shared_bytes": engine.shared_bytes()} if "K" in res.info else
                      {k: res.info[k] for k in ("reversal_max_abs_error", "buffer_bits", "information_floor_bits")})}
        np.savez(out / "hypergradient.npz", **{k: v for k, v in grads.items()}, grad_w0=res.grad_w0)
        print(f"validation loss {res.objective:.6f} (error {res.info['val_error']:.4f}); |hypergradient|: "
              + ", ".join(f"{k} {v:.3e}" for k, v in metrics["hypergradient_norm"].items()))
    else:
        ckpt = out / "checkpoint.npz"
        stable = {k: v for k, v in config.items()
                  if k not in ("resume", "no_progress", "out", "meta_iters", "overwrite")}
        t1 = time.perf_counter()
        with interrupt.resumable(interrupt.resume_argv(record_argv("gpu_ver", args), ["--resume"], out=out)):
            hypers, hist = meta.run(engine, hypers, n_meta=args.meta_iters, optimizer=args.optimizer,
                                    meta_lr=args.meta_lr, clip=Clip(args.clip, args.clip_value),
                                    checkpoint=ckpt, resume=args.resume is not None, config=stable,
                                    progress=not args.no_progress)
        timings["meta_s"] = float(sum(hist["seconds"]))      # every meta-iteration, also before a resume
        timings["this_process_meta_s"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        final = meta.evaluate_hypers(engine, hypers)          # the saved hyperparameters, after the last update
        timings["final_s"] = time.perf_counter() - t1
        hypers.save(out / "hypers")
        if hist["val_loss"]:
            try:
                plot_history(hist, out / "learning_curves.png",
                             f"meta-optimisation ({'exact' if args.method == 'exact' else 'DrMAD'})")
            except ImportError:                      # e.g. a GPU machine without matplotlib
                print("matplotlib not installed: learning_curves.png skipped", file=sys.stderr)
            print(f"validation loss {hist['val_loss'][0]:.4f} -> {final['val_loss']:.4f} over "
                  f"{len(hist['val_loss'])} meta-iterations (the saved hyperparameters); test error "
                  f"{hist['test_error'][0]:.4f} -> {final.get('test_error', float('nan')):.4f}")
        metrics = {**hist, **{f"final_{k}": v for k, v in final.items()}, "learned": hypers.describe()}
    records.write_results(out, record_argv("gpu_ver", args), config, metrics, timings)
    print(f"results: {out / records.RESULTS_FILE}")
    return 0
