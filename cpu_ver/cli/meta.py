"""``python -m cpu_ver meta``: meta-optimisation of the hyperparameters (``cpu_ver.meta.run``)
with exact or DrMAD hypergradients; checkpoints every meta-iteration and resumes with --resume.
"""
from __future__ import annotations

import time

from cpu_ver.cli.problem import build, drmad_options, finish, run_config, record_argv
from shared.interrupt import resumable, resume_argv

CHECKPOINT = "checkpoint.npz"


def cmd_meta(args):
    from cpu_ver import meta, plots

    problem, hypers, data = build(args)
    start = hypers
    config = run_config(args, data)
    from shared.records import make_run_dir
    run_dir = make_run_dir(args.out)          # resolved once, in main()
    ckpt = run_dir / CHECKPOINT
    stable = {k: v for k, v in config.items() if k not in ("resume", "progress", "out", "meta_iters", "overwrite")}
    t0 = time.perf_counter()
    with resumable(resume_argv(record_argv(args), ["--resume"], out=run_dir)):
        hypers, hist = meta.run(problem, hypers, n_meta=args.meta_iters, method=args.method,
                                drmad_opts=drmad_options(args), optimizer=args.optimizer, meta_lr=args.meta_lr,
                                clip=args.clip, checkpoint=ckpt, resume=args.resume is not None, config=stable,
                                progress=args.progress)
    timings = {"meta_s": float(sum(hist["seconds"])), "this_process_meta_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    final = meta.evaluate_hypers(problem, hypers)       # the saved hyperparameters, after the last update
    timings["final_s"] = time.perf_counter() - t0
    hypers.save(run_dir / "hypers")
    if hist["val_loss"]:        # no curve without a meta-iteration (as gpu_ver drmad)
        plots.learning_curves(hist, run_dir / "learning_curves.png",
                              f"meta-optimisation ({args.method}, {args.optimizer})", final=final)
    plots.hyperparameters(hypers, run_dir / "hyperparameters.png")
    from shared.plotting import schedules_figure
    schedules_figure(run_dir / "schedules.png", hypers, start,
                     f"meta-optimisation ({args.method}, {args.optimizer}, "
                     f"{len(hist['val_loss'])} meta-iteration{'' if len(hist['val_loss']) == 1 else 's'})")
    metrics = dict(hist)
    metrics.update({f"final_{k}": v for k, v in final.items()})
    metrics["learned"] = hypers.describe()
    if hist["val_loss"]:
        first_err = hist["test_error"][0]
        print(f"validation loss {hist['val_loss'][0]:.4f} -> {final['val_loss']:.4f} over "
              f"{len(hist['val_loss'])} meta-iterations (the saved hyperparameters); test error "
              f"{first_err:.4f} -> {final.get('test_error', float('nan')):.4f}")
    finish(args, "meta", config, metrics, timings)
