"""``python -m cpu_ver adaptive``: one online run (cpu_ver/online/) with curves,
hyperparameter trajectories, plots and results.json.

``add_adaptive_arguments(parser)`` adds the options to a (sub)parser;
``run_adaptive(args)`` runs and returns the results dictionary. The plain
optimiser (SGD, Nesterov SGD or Adam to match the method) is run beside it
for the same steps, seed and batches unless ``--no-baseline``.

metrics: ``step``, ``train_loss`` (full training cross-entropy), ``val_loss``,
``val_error`` per logged step; ``lr_quantiles`` / ``l2_quantiles`` (logged step
x block x quantile, quantiles in ``quantiles``, blocks in ``blocks``);
``final_train_loss``, ``final_val_loss``, ``final_val_error``, ``test_loss``, ``test_error``;
``baseline`` (the plain optimiser's curves and the same finals) and
``val_loss_adaptive_minus_baseline`` (the names of gpu_ver adaptive);
``n_projected`` (learning-rate projections that bit, additive HD only).

Checkpoints: ``checkpoint-adaptive.npz`` and ``checkpoint-baseline.npz`` in the run
folder (every ``--checkpoint-every`` steps, at the end of each run, on Ctrl-C);
``--resume RUN_FOLDER`` continues there and gives the results of an uninterrupted
run; ``--stop-after N`` stops after N steps (the adaptive run's, then the
baseline's), as an interruption would.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from shared.online_cli import (CHECKPOINTS, add_method_arguments, add_run_arguments, baseline_kwargs, baseline_metrics,
                               check_checkpoint_options, final_metrics, jsonable_start, kwargs_from_start,
                               resolve_run_dir, resume_command, run_identity, start_from_hypers, stop_for_baseline)
from shared.online_spec import BASELINE_OF, METHOD_NAMES
from shared.cli import invocation
from shared.errors import ConfigError

_DEFAULT_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def _has(parser, opt):
    return opt in parser._option_string_actions


def add_adaptive_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``adaptive`` command's options to ``parser`` (``--seed``/``--out`` unless present)."""
    a = parser.add_argument
    if not _has(parser, "--seed"):
        a("--seed", type=int, default=0, help="seed for initial weights and minibatches (default 0)")
    if not _has(parser, "--out"):
        a("--out", default=None, help="output folder (default runs/adaptive-<time>)")
    a("--method", default="hd", choices=METHOD_NAMES, help="online method (default hd)")
    a("--dataset", default="digits", choices=("digits", "mnist", "mnist-t10k", "synthetic"),
      help="digits (default, embedded), mnist (4 IDX files), mnist-t10k (t10k pair only), synthetic")
    a("--data-dir", default=None, help=f"folder with the MNIST IDX files (default {_DEFAULT_MNIST} if present)")
    a("--n-train", type=int, default=None, help="training examples (loader default)")
    a("--n-val", type=int, default=None, help="validation examples (loader default)")
    a("--layers", default=None, help="layer sizes, e.g. 64,50,10 (default: input,50,classes; "
                                     "'input,classes' style for logistic regression)")
    a("--activation", default="tanh", choices=("tanh", "relu", "softplus"))
    a("--steps", type=int, default=500, help="minibatch steps (default 500)")
    a("--batch", type=int, default=128, help="minibatch size (default 128)")
    a("--lr", type=float, default=1e-2, help="initial learning rate alpha_0 (default 1e-2)")
    add_method_arguments(a)
    a("--no-baseline", dest="baseline", action="store_false", help="skip the plain optimiser's run")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_run_arguments(parser)
    return parser


def baseline_method(args, layout, start=None):
    """The plain optimiser for ``args.method``, from the same starting values (``start``)."""
    from cpu_ver import online as ad
    return ad.make_method(BASELINE_OF.get(args.method, "sgd"), layout, **baseline_kwargs(args, start, layout))


def _load(args):
    from shared.datasets import load

    data_dir = args.data_dir
    if data_dir is None and args.dataset in ("mnist", "mnist-t10k") and _DEFAULT_MNIST.is_dir():
        data_dir = str(_DEFAULT_MNIST)
    return load(args.dataset, data_dir=data_dir, n_train=args.n_train, n_val=args.n_val, seed=args.seed)


def _plot(run_dir, res, base, method_name, base_name, data_label):
    """curves.png, hyperparameters.png, hyper_heatmap.png (``shared.plotting``, as gpu_ver draws them)."""
    from shared.plotting import adaptive_figures

    return adaptive_figures(run_dir, res, base, method_name, base_name, data_label)


def _rows(X):
    """Inputs as (n, features), also for an empty split (``reshape(0, -1)`` is ambiguous)."""
    import numpy as np
    return X.reshape(len(X), int(np.prod(X.shape[1:], dtype=np.int64)))


def run_adaptive(args) -> dict:
    """Run ``args.method`` (and the plain baseline), write results.json and plots; return results."""
    from cpu_ver import online as ad
    from cpu_ver.models import MLP, parse_layers
    from shared.online import check_validation_split
    from cpu_ver.__main__ import PROG
    from shared.interrupt import resumable
    from shared.records import load_checkpoint, write_results

    timings = {}
    t0 = time.perf_counter()
    ds = _load(args)
    timings["load_s"] = time.perf_counter() - t0
    X, y, Xv, yv = _rows(ds.train.X), ds.train.y, _rows(ds.val.X), ds.val.y
    sizes = parse_layers(args.layers) if args.layers else (X.shape[1], 50, ds.n_classes)
    model = MLP(sizes, args.activation)
    model.check_data(X, y, "training split")
    if args.steps < 1 or args.eval_every < 1:
        raise ConfigError("--steps and --eval-every must be >= 1")
    check_checkpoint_options(args)
    start = start_from_hypers(args, model.layout)          # --hypers-from, before the run folder
    method = ad.make_method(args.method, model.layout, **kwargs_from_start(args, start, model.layout))
    check_validation_split(args.method, method.needs_val, len(yv))      # before the run folder is made
    run_dir = resolve_run_dir(args)
    identity = run_identity(args, "cpu_ver adaptive", layers=list(sizes), data=ds.describe())

    def phase(name, meth, stop, **kw):
        """One training run with its checkpoint (resumed when --resume finds it)."""
        path = run_dir / CHECKPOINTS[name]
        ident = {**identity, "phase": name}
        resume = load_checkpoint(path, expect=ident) if args.resume is not None and path.exists() else None
        with resumable(resume_command(PROG, args, run_dir)):
            return ad.train_online(meth, model, (X, y, Xv, yv), args.steps, args.batch, args.seed, args.eval_every,
                                   progress=args.progress, checkpoint=path, checkpoint_every=args.checkpoint_every,
                                   identity=ident, resume=resume, stop_after=stop, **kw)

    def stopped(name, done):
        print(f"{name}: stopped after {done} of {args.steps} steps; continue with --resume {run_dir}")
        return {"run_dir": str(run_dir), "completed": False, "phase": name, "steps_done": done}

    t0 = time.perf_counter()
    res, w, state = phase("adaptive", method, args.stop_after, desc=args.method)
    timings["this_process_train_s"] = time.perf_counter() - t0
    timings["train_s"] = res.pop("spent_s")            # the whole run, also the part before a resume
    if res["steps_done"] < args.steps:
        return stopped("adaptive", res["steps_done"])
    metrics = dict(res)
    Xt, yt, has_test = _rows(ds.test.X), ds.test.y, len(ds.test) > 0

    def test_metrics(weights):
        """(test cross-entropy, test error) of ``weights``; (None, None) without a test split."""
        return (model.nll(weights, Xt, yt), model.error(weights, Xt, yt)) if has_test else (None, None)

    metrics.update(final_metrics(res, *test_metrics(w), has_test))
    lr_state = state.lr if isinstance(state, ad.CombinedState) else state
    if hasattr(lr_state, "n_projected"):
        metrics["n_projected"] = int(lr_state.n_projected)
    base = None
    base_name = BASELINE_OF.get(args.method, "sgd")
    if args.baseline:
        stop = stop_for_baseline(args.stop_after, args.steps)
        if stop is not None and stop <= 0:
            return stopped("baseline", 0)
        t0 = time.perf_counter()
        base, wb, _ = phase("baseline", baseline_method(args, model.layout, start=start), stop,
                            record_hypers=False, desc=base_name)
        timings["this_process_baseline_s"] = time.perf_counter() - t0
        timings["baseline_s"] = base.pop("spent_s")
        if base["steps_done"] < args.steps:
            return stopped("baseline", base["steps_done"])
        metrics.update(baseline_metrics(base, base_name, *test_metrics(wb), has_test, metrics))
    t0 = time.perf_counter()
    _plot(run_dir, res, base, args.method, base_name,
          f"{ds.name}, {len(y)} training examples, {args.steps} steps")
    timings["plots_s"] = time.perf_counter() - t0
    config = {k: v for k, v in vars(args).items() if not callable(v) and not k.startswith("_")}
    config.update(layers=list(sizes), method_config=method.config, data=ds.describe())
    if start:
        config["hypers_start"] = jsonable_start(start)
    argv = invocation("cpu_ver", getattr(args, "_argv", ["adaptive", *sys.argv[1:]]))
    write_results(run_dir, argv, config, metrics, timings, packages=("numpy", "scipy", "autograd"))
    line = (f"{args.method}: final train loss {metrics['final_train_loss']:.4f}, val loss "
            f"{metrics['final_val_loss']:.4f}, val error {metrics['final_val_error']:.4f}")
    if base is not None:
        line += f"; {base_name}: train loss {base['train_loss'][-1]:.4f}, val loss {base['val_loss'][-1]:.4f}"
    print(line)
    print(f"results: {Path(run_dir) / 'results.json'}")
    return {"run_dir": str(run_dir), "config": config, "metrics": metrics, "timings": timings}


def main(argv=None):
    """Stand-alone entry (``python -m cpu_ver.cli.adaptive``) until __main__ registers the command."""
    p = add_adaptive_arguments(argparse.ArgumentParser(prog="python -m cpu_ver adaptive", description=__doc__,
                                                       formatter_class=argparse.RawDescriptionHelpFormatter))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args._argv = ["adaptive", *argv]
    run_adaptive(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
