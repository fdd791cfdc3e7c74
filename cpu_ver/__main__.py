"""``python -m cpu_ver hypergrad|meta|check|adaptive|summarize|sweep`` (README.md, "Commands").

Every command takes --seed, --out DIR (default runs/<command>-<time>), --overwrite
and --help, shows progress bars, and writes DIR/results.json atomically with the
keys command, versions, config, metrics and timings; PNG plots, checkpoints and
command.txt go beside it, all in that one folder. Input problems (checked before
any work: option ranges, the run folder) end with a one-line ``error: ...`` on
stderr and exit status 2. ``summarize RUN_DIR...`` prints one table of earlier runs
and writes a folder (summary.csv, command.txt) only when --out is given. ``sweep SPEC``
(``shared/sweep_cli.py``, the same command in gpu_ver) runs a sweep spec on Dask and
manages its own sweep folder.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from shared import cli
from shared.errors import ConfigError
from shared.interrupt import deferred, report, resumable, resume_argv
from shared.online_cli import CHECKPOINTS

PROG = "python -m cpu_ver"
PACKAGES = ("numpy", "scipy", "autograd")
GROUPS = ("l2", "lr", "momentum", "init_scale")
DEFAULT_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


# --- shared options ---------------------------------------------------------------------
def _common(p):
    p.add_argument("--seed", type=int, default=0, help="seed for data split, initial weights and batches")
    p.add_argument("--out", default=None, help="run folder (default runs/<command>-<time>)")
    cli.add_overwrite_argument(p.add_argument)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _problem_options(p, iters=100, batch=100):
    p.add_argument("--dataset", default="digits", choices=("digits", "mnist", "mnist-t10k", "synthetic"),
                   help="digits (embedded default), mnist (4 IDX .gz files in --data-dir), "
                        "mnist-t10k (only the t10k pair), synthetic")
    p.add_argument("--data-dir", default=None, help="folder with the data files")
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-val", type=int, default=None)
    p.add_argument("--layers", default=None, help="layer sizes, e.g. 64,50,10 (default: input,50,classes)")
    p.add_argument("--activation", default="tanh", choices=("tanh", "relu", "softplus"))
    p.add_argument("--iters", type=int, default=iters, help="training steps T")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--lr", type=float, default=0.3, help="initial learning rate (all steps and blocks)")
    p.add_argument("--momentum", type=float, default=0.9, help="initial momentum, in (0, 1)")
    p.add_argument("--l2", type=float, default=1e-4, help="initial L2 strength (> 0)")
    p.add_argument("--l2-shape", default="param", choices=("scalar", "block", "param"))
    cli.add_l2_on_argument(p.add_argument)
    p.add_argument("--lr-shape", default="iter_block", choices=("scalar", "block", "iter", "iter_block"))
    p.add_argument("--momentum-shape", default="iter_block", choices=("scalar", "block", "iter", "iter_block"))
    p.add_argument("--objective", default="val", choices=("val", "train"),
                   help="meta-objective: validation (default) or training cross-entropy")
    p.add_argument("--hypers", default="l2,lr,momentum,init_scale",
                   help="hyperparameter groups to differentiate/tune, from l2,lr,momentum,init_scale")
    p.add_argument("--hypers-from", default=None, metavar="RUN_DIR|FILE",
                   help="start from the hyperparameters a run saved (RUN_DIR/hypers.json, or a hypers.npz/json "
                        "file); they replace --lr, --momentum, --l2 and the --*-shape options")
    p.add_argument("--K", type=int, default=1, help="DrMAD checkpoint segments (1 = DrMAD)")
    p.add_argument("--grid", default="t/T", choices=("t/T", "cumlr"), help="DrMAD interpolation grid")
    p.add_argument("--velocity", default="reconstruct", choices=("reconstruct", "ignore"), help="DrMAD velocity")


def build(args):
    """(problem, hypers, dataset) from the parsed options, with clear errors for bad input."""
    from cpu_ver.models import MLP, parse_layers
    from cpu_ver.problem import Problem
    from shared.datasets import load
    from shared.hyperparams import load_for_run, standard

    data_dir = args.data_dir
    if data_dir is None and args.dataset.startswith("mnist") and DEFAULT_MNIST.exists():
        data_dir = DEFAULT_MNIST
    data = load(args.dataset, data_dir=data_dir, n_train=args.n_train, n_val=args.n_val, seed=args.seed)
    n_in = int(np.prod(data.train.X.shape[1:]))
    sizes = parse_layers(args.layers) if args.layers else (n_in, 50, data.n_classes)
    model = MLP(sizes, args.activation)
    if not 0 < args.momentum < 1:
        raise ConfigError(f"--momentum must lie in (0, 1), got {args.momentum}")
    if not args.lr > 0 or not args.l2 > 0:
        raise ConfigError(f"--lr and --l2 must be positive (they are tuned in log space), got {args.lr}, {args.l2}")
    groups = cli.parse_groups(args.hypers, GROUPS)
    problem = Problem.from_dataset(model, data, n_iters=args.iters, batch_size=args.batch,
                                   batch_seed=args.seed, init_seed=args.seed, meta_objective=args.objective)
    hypers = standard(model.layout, args.iters, lr=args.lr, momentum=args.momentum, l2=args.l2,
                      init_scales=model.default_init_scales(), groups=groups, l2_shape=args.l2_shape,
                      lr_shape=args.lr_shape, momentum_shape=args.momentum_shape, l2_on=args.l2_on)
    if getattr(args, "hypers_from", None):
        hypers = load_for_run(args.hypers_from, model.layout, args.iters, groups, l2_on=args.l2_on)
    return problem, hypers, data


def _drmad_opts(args):
    return {"K": args.K, "grid": args.grid, "velocity": args.velocity}


def _config(args, data=None):
    cfg = {k: v for k, v in vars(args).items() if k != "func" and not k.startswith("_")}
    if data is not None:
        cfg["data"] = data.describe()
    return cfg


def _finish(args, command, config, metrics, timings):
    from shared.records import write_results
    run_dir = Path(args.out)
    path = write_results(run_dir, record_argv(args), config, metrics, timings, packages=PACKAGES)
    print(f"results: {path}")
    return run_dir


# --- hypergrad --------------------------------------------------------------------------
def cmd_hypergrad(args):
    from cpu_ver import drmad, reversible
    from cpu_ver.fdcheck import check_groups

    problem, hypers, data = build(args)
    timings, metrics = {}, {}
    tuned = hypers.tuned
    results = {}
    if args.method in ("exact", "all"):
        t0 = time.perf_counter()
        results["exact"] = reversible.hypergradient(problem, hypers, progress=args.progress)
        timings["exact_s"] = time.perf_counter() - t0
        metrics.update(results["exact"].info)
    if args.method in ("drmad", "all"):
        t0 = time.perf_counter()
        results["drmad"] = drmad.hypergradient(problem, hypers, progress=args.progress, **_drmad_opts(args))
        timings["drmad_s"] = time.perf_counter() - t0
    if args.method == "fd":
        t0 = time.perf_counter()
        results["exact"] = reversible.hypergradient(problem, hypers, progress=args.progress)
        rows = check_groups(problem, hypers, results["exact"].grads, seed=args.seed, groups=tuned)
        metrics["fd_directional"] = {r[0]: {"analytic": r[1], "numeric": r[2], "rel_err": r[3]} for r in rows}
        timings["fd_s"] = time.perf_counter() - t0
    main_res = results.get("exact") or results.get("drmad")
    metrics["val_loss"] = main_res.objective
    metrics["hypergradient"] = {g: main_res.grads[g].tolist() for g in tuned if g in main_res.grads}
    metrics["hypergradient_norm"] = {g: float(np.linalg.norm(main_res.grads[g]))
                                     for g in tuned if g in main_res.grads}
    if args.method == "all":
        ex, dm = results["exact"].grads, results["drmad"].grads
        cos, sign = {}, {}
        for g in tuned:
            if g in dm:
                a, b = ex[g].ravel(), dm[g].ravel()
                cos[g] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))
                sign[g] = float(np.mean(np.sign(a) == np.sign(b)))      # fraction of entries of the same sign
        metrics["cosine_drmad_vs_exact"] = cos
        metrics["sign_agreement_drmad_vs_exact"] = sign
        metrics["drmad_hypergradient"] = {g: dm[g].tolist() for g in tuned if g in dm}
        t0 = time.perf_counter()
        rows = check_groups(problem, hypers, ex, seed=args.seed, groups=tuned)
        timings["fd_s"] = time.perf_counter() - t0
        metrics["max_rel_err_exact_vs_fd"] = max(r[3] for r in rows)
        metrics["fd_directional"] = {r[0]: {"analytic": r[1], "numeric": r[2], "rel_err": r[3]} for r in rows}
    from shared.plotting import METHOD_LABELS, hypergradient_figure, save_hypergradients
    grads = {m: r.grads for m, r in results.items()}
    save_hypergradients(Path(args.out) / "hypergradient.npz", grads, tuned)
    hypergradient_figure(Path(args.out) / "hypergradient.png", hypers, grads,
                         f"hypergradients of the validation loss: {', '.join(METHOD_LABELS.get(m, m) for m in grads)} "
                         f"- {data.name}, {args.iters} training steps")
    print(f"objective {metrics['val_loss']:.6f}; |hypergradient| per group: "
          + ", ".join(f"{k} {v:.3e}" for k, v in metrics["hypergradient_norm"].items()))
    for k in ("reversal_max_abs_error", "buffer_bits_per_weight_step", "cosine_drmad_vs_exact",
              "max_rel_err_exact_vs_fd"):
        if k in metrics:
            print(f"{k}: {metrics[k]}")
    _finish(args, "hypergrad", _config(args, data), metrics, timings)


# --- meta -------------------------------------------------------------------------------
def cmd_meta(args):
    from cpu_ver import meta, plots

    problem, hypers, data = build(args)
    start = hypers
    config = _config(args, data)
    from shared.records import make_run_dir
    run_dir = make_run_dir(args.out)          # resolved once, in main()
    ckpt = run_dir / CHECKPOINT["meta"]
    stable = {k: v for k, v in config.items() if k not in ("resume", "progress", "out", "meta_iters", "overwrite")}
    t0 = time.perf_counter()
    with resumable(resume_argv(record_argv(args), ["--resume"], out=run_dir)):
        hypers, hist = meta.run(problem, hypers, n_meta=args.meta_iters, method=args.method,
                                drmad_opts=_drmad_opts(args), optimizer=args.optimizer, meta_lr=args.meta_lr,
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
    _finish(args, "meta", config, metrics, timings)


# --- check ------------------------------------------------------------------------------
def cmd_check(args):
    from cpu_ver.fdcheck import check_methods

    t0 = time.perf_counter()
    table = check_methods(seed=args.seed, T=args.iters)
    timings = {"hypergradients_s": time.perf_counter() - t0}
    rows = [(m, g, a, n, e) for m, rs in table.items() for (g, a, n, e) in rs]
    try:
        from cpu_ver import online as adaptive
        t0 = time.perf_counter()
        for m, e in adaptive.check_all(tol=args.tol).items():
            rows.append((f"adaptive:{m}", "one-step", float("nan"), float("nan"), float(e)))
        timings["adaptive_s"] = time.perf_counter() - t0
    except ImportError:
        pass
    print(f"{'method':<28}{'group':<12}{'analytic':>16}{'finite diff':>16}{'rel err':>11}")
    for m, g, a, n, e in rows:
        flag = "" if e <= args.tol else "  FAIL"
        a_s, n_s = (f"{a:>16.8e}", f"{n:>16.8e}") if np.isfinite(a) else (f"{'-':>16}", f"{'-':>16}")
        print(f"{m:<28}{g:<12}{a_s}{n_s}{e:>11.2e}{flag}")
    worst = {}
    for m, g, a, n, e in rows:
        worst[m] = max(worst.get(m, 0.0), e)
    _finish(args, "check", _config(args), {"max_rel_err": worst,
                                             "rows": [list(r) for r in rows]}, timings)
    bad = [m for m, e in worst.items() if not e <= args.tol]
    if bad:
        print(f"FAILED (tolerance {args.tol:g}): {', '.join(bad)}", file=sys.stderr)
        return 1
    print(f"all {len(rows)} checks within {args.tol:g}")
    return 0


def cmd_adaptive(args):
    from cpu_ver.cli.adaptive import run_adaptive
    run_adaptive(args)


def cmd_summarize(args):
    from shared.summarize_cli import run_summarize
    return run_summarize(args, record_argv(args))


def cmd_sweep(args):
    from shared.sweep_cli import run_sweep
    return run_sweep(args, record_argv(args))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    h = sub.add_parser("hypergrad", help="one hypergradient of the validation loss")
    _common(h), _problem_options(h)
    h.add_argument("--method", default="exact", choices=("exact", "drmad", "fd", "all"))
    h.set_defaults(func=cmd_hypergrad)

    m = sub.add_parser("meta", help="meta-optimisation of hyperparameters (exact or DrMAD)")
    _common(m), _problem_options(m)
    m.add_argument("--method", default="exact", choices=("exact", "drmad"))
    m.add_argument("--meta-iters", type=int, default=30)
    m.add_argument("--optimizer", default="adam", choices=("adam", "sgd", "sign"))
    m.add_argument("--meta-lr", type=float, default=0.05)
    m.add_argument("--clip", type=float, default=None, help="clip the hypergradient to this norm")
    cli.add_resume_argument(m.add_argument)
    m.set_defaults(func=cmd_meta)

    c = sub.add_parser("check", help="finite-difference checks of every hypergradient method")
    _common(c)
    c.add_argument("--iters", type=int, default=50, help="training steps of the check problem")
    c.add_argument("--tol", type=float, default=1e-6)
    c.set_defaults(func=cmd_check)

    a = sub.add_parser("adaptive", help="online hyperparameter adaptation during one training run")
    from cpu_ver.cli.adaptive import add_adaptive_arguments
    add_adaptive_arguments(a)
    a.set_defaults(func=cmd_adaptive)

    from shared.summarize_cli import HELP, add_summarize_arguments
    s = sub.add_parser("summarize", help=HELP, description=HELP)
    s.add_argument("--out", default=None, help="write summary.csv there (default: print only)")
    cli.add_overwrite_argument(s.add_argument)
    add_summarize_arguments(s)
    s.set_defaults(func=cmd_summarize)

    from shared.sweep_cli import HELP as SWEEP_HELP, add_sweep_arguments
    w = sub.add_parser("sweep", help=SWEEP_HELP, description=SWEEP_HELP)
    add_sweep_arguments(w)
    w.set_defaults(func=cmd_sweep)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The full parser (the name gpu_ver uses; ``shared/sweep_cli.py`` reads it)."""
    return parser()


def checkpoint_file(command: str):
    """The file ``--resume`` of ``command`` continues from (None: the command does not resume)."""
    return CHECKPOINT.get(command)


# The checkpoint a command resumes from (commands without one cannot be resumed).
CHECKPOINT = {"meta": "checkpoint.npz", "adaptive": CHECKPOINTS["adaptive"]}
# Commands that make a run folder only when --out is given (the others default to runs/<command>-<time>).
PRINT_ONLY = ("summarize",)
# Commands that check and write their folder themselves (the sweep folder and its manifest).
OWN_FOLDER = ("sweep",)


def record_argv(args) -> list:
    """The command line for command.txt and results.json, as a person would paste it."""
    return cli.invocation("cpu_ver", args._argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args._argv = argv

    def work():
        cli.check_options(args)
        if args.command not in OWN_FOLDER and (args.command not in PRINT_ONLY or args.out):
            cli.prepare_run_folder(args, args.command, CHECKPOINT.get(args.command))
        # the commands that checkpoint: Ctrl-C from the start to the last file stops at a step boundary
        with deferred() if args.func in (cmd_meta, cmd_adaptive) else nullcontext():
            return args.func(args)
    try:
        return cli.run_guarded(work)
    except KeyboardInterrupt as e:       # a checkpointing command stopped between two steps, or a hard stop
        return report(e)


if __name__ == "__main__":
    sys.exit(main())
