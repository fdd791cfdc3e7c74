"""``python -m gpu_ver adaptive``: one online run on the Theano backend (gpu_ver/online/),
beside plain SGD (Nesterov SGD for sgdn-hd, Adam for adam-hd) for the same steps, seed
and minibatches, with curves, hyperparameter trajectories, plots and results.json.

Model: a small DenseNet (default: depth 7, growth 4) on synthetic CIFAR-format
images (``gpu_ver.train.synthetic_images``; ``--image-size``), or on CIFAR-10
with ``--data-dir`` (``shared.datasets.load('cifar10', ...)``); or ``--model mlp``
on the embedded digits. Batch norm uses batch statistics in every gradient and
hypergradient; the curves are evaluated with the BN running averages.

Registration in ``gpu_ver/__main__.py``: ``Command(help, add_adaptive_arguments,
run_adaptive_command)`` (``run_adaptive`` itself returns the results dict).
This module does not import Theano at import time: ``add_adaptive_arguments``
can be called before ``gpu_ver.config.load``; ``run_adaptive`` loads Theano
(with whatever ``--device``/``--floatX`` the caller set up first).

metrics: ``step``, ``train_loss`` (CE on the first ``--eval-train-n`` training
examples), ``val_loss``, ``val_error``, ``batch_loss`` (mean training-batch loss
since the previous log) per logged step; ``lr_quantiles`` / ``l2_quantiles``
(logged step x block x quantile; ``quantiles``, ``blocks``); ``final_*``;
``test_error``; ``baseline`` (the plain optimiser's curves and finals);
``val_loss_adaptive_minus_baseline``; ``n_projected`` (additive HD only).
Plots: ``curves.png``, ``hyperparameters.png`` (median and 10-90% band per
layer over time), ``hyper_heatmap.png`` (log10 median per layer x time);
skipped with a warning when matplotlib is missing.

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
import warnings
from pathlib import Path

import numpy as np

from shared.online import check_validation_split
from shared.online_cli import (CHECKPOINTS, add_method_arguments, add_run_arguments, baseline_kwargs, baseline_metrics,
                               check_checkpoint_options, final_metrics, jsonable_start, kwargs_from_start,
                               resolve_run_dir, resume_command, run_identity, start_from_hypers, stop_for_baseline)
from shared.online_spec import BASELINE_OF, METHOD_NAMES
from shared.cli import invocation
from shared.errors import ConfigError



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
    a("--model", default="densenet", choices=("densenet", "mlp"), help="densenet (default) or mlp")
    a("--depth", type=int, default=7, help="DenseNet depth 3n + 4 (default 7)")
    a("--growth", type=int, default=4, help="DenseNet growth rate (default 4)")
    a("--bottleneck", action="store_true", help="DenseNet-B")
    a("--compression", type=float, default=1.0, help="DenseNet-C compression in (0, 1]")
    a("--layers", default=None, help="MLP hidden sizes, e.g. 50 or 100,100 (default 50)")
    a("--activation", default=None, choices=("tanh", "relu", "softplus"),
      help="default relu (densenet), tanh (mlp)")
    a("--dataset", default="auto", choices=("auto", "synthetic-images", "cifar10", "digits"),
      help="auto (default): cifar10 when --data-dir is given, else synthetic images for densenet, "
           "digits for mlp")
    a("--data-dir", default=None, help="CIFAR-10 folder or tarball (shared.datasets.load('cifar10'))")
    a("--image-size", type=int, default=16, help="synthetic images: height = width (default 16)")
    a("--n-train", type=int, default=None, help="training examples (default 1024 synthetic, loader's otherwise)")
    a("--n-val", type=int, default=None, help="validation examples (default 256 synthetic, loader's otherwise)")
    a("--n-test", type=int, default=None, help="test examples (default 256 synthetic, loader's otherwise)")
    a("--steps", type=int, default=200, help="minibatch steps (default 200)")
    a("--batch", type=int, default=32, help="minibatch size (default 32)")
    a("--lr", type=float, default=0.05, help="initial learning rate alpha_0 (default 0.05)")
    add_method_arguments(a)
    a("--eval-train-n", type=int, default=512, help="training examples in the logged training loss (default 512)")
    a("--eval-batch", type=int, default=500, help="evaluation chunk size (default 500)")
    a("--no-baseline", dest="baseline", action="store_false", help="skip the plain optimiser's run")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_run_arguments(parser)
    return parser


def baseline_method(args, layout, ad, start=None):
    """The plain optimiser for ``args.method``, from the same starting values (``start``)."""
    return ad.make_method(BASELINE_OF.get(args.method, "sgd"), layout, **baseline_kwargs(args, start, layout))


def load_data(args):
    """The Dataset for ``args`` (see ``--dataset``)."""
    from shared import datasets  # noqa: PLC0415

    name = args.dataset
    if name == "auto":
        name = "cifar10" if args.data_dir else ("synthetic-images" if args.model == "densenet" else "digits")
    if name == "synthetic-images":
        from gpu_ver.train import synthetic_images  # noqa: PLC0415

        if args.image_size < 4 or args.image_size % 4:
            raise ConfigError(f"--image-size must be a positive multiple of 4, got {args.image_size}")
        return synthetic_images(1024 if args.n_train is None else args.n_train,
                                256 if args.n_val is None else args.n_val,
                                256 if args.n_test is None else args.n_test, size=args.image_size, seed=args.seed)
    if name == "cifar10" and not args.data_dir:
        raise ConfigError("--dataset cifar10 needs --data-dir (CIFAR-10 python folder or tarball)")
    return datasets.load(name, data_dir=args.data_dir, n_train=args.n_train, n_val=args.n_val,
                         n_test=args.n_test, seed=args.seed)


def build_model(args, ds, M):
    from shared.mlp_spec import parse_layers  # noqa: PLC0415

    if args.model == "mlp":
        hidden = parse_layers(f"1,{args.layers}")[1:] if args.layers else (50,)
        return M.MLP((ds.n_features, *hidden, ds.n_classes), args.activation or "tanh")
    if np.ndim(ds.train.X) != 4:
        raise ConfigError(f"--model densenet needs image data (n, channels, H, W); dataset {ds.name!r} has "
                          f"inputs of shape {ds.input_shape} (use --model mlp)")
    net = M.DenseNet(args.depth, args.growth, args.bottleneck, args.compression, ds.n_classes,
                     tuple(ds.input_shape), args.activation or "relu")
    net.check_data(ds.train.X, ds.train.y, "training split")
    return net


# --------------------------------------------------------------------------- plots
def _plot(run_dir, res, base, method_name, base_name, data_label) -> list:
    """curves.png, hyperparameters.png, hyper_heatmap.png (``shared.plotting``, as cpu_ver draws them);
    returns the files written."""
    from shared.plotting import adaptive_figures  # noqa: PLC0415

    return adaptive_figures(run_dir, res, base, method_name, base_name, data_label)


def try_plot(run_dir, res, base, method_name, base_name, data_label="") -> list:
    """``_plot``, or a warning and no files when matplotlib cannot be imported (GPU machines)."""
    try:
        return _plot(run_dir, res, base, method_name, base_name, data_label)
    except ImportError as e:
        warnings.warn(f"matplotlib is not available ({e}); plots skipped", RuntimeWarning, stacklevel=2)
        return []


# --------------------------------------------------------------------------- run
def run_adaptive(args) -> dict:
    """Run ``args.method`` (and the plain baseline), write results.json and plots; return results."""
    from gpu_ver import config  # noqa: PLC0415

    theano = config.load()
    from gpu_ver import online as ad  # noqa: PLC0415 (after config.load)
    from gpu_ver import models as M  # noqa: PLC0415
    from gpu_ver.__main__ import PROG  # noqa: PLC0415
    from shared.interrupt import resumable  # noqa: PLC0415
    from shared.records import load_checkpoint, write_results  # noqa: PLC0415

    if args.steps < 1 or args.eval_every < 1 or args.eval_train_n < 1 or args.eval_batch < 1:
        raise ConfigError("--steps, --eval-every, --eval-train-n and --eval-batch must be >= 1")
    check_checkpoint_options(args)
    timings = {}
    t0 = time.perf_counter()
    ds = load_data(args)
    timings["load_s"] = time.perf_counter() - t0
    model = build_model(args, ds, M)
    start = start_from_hypers(args, model.layout)          # --hypers-from, before the run folder
    method = ad.make_method(args.method, model.layout, **kwargs_from_start(args, start, model.layout))
    check_validation_split(args.method, method.needs_val, len(ds.val))
    run_dir = resolve_run_dir(args)
    X, y, Xv, yv = ds.train.X, ds.train.y, ds.val.X, ds.val.y
    identity = run_identity(args, "gpu_ver adaptive", model=model.describe(), data=ds.describe(),
                            floatX=str(theano.config.floatX))

    def phase(name, meth, stop, **kw):
        """One training run with its checkpoint (resumed when --resume finds it)."""
        path = run_dir / CHECKPOINTS[name]
        ident = {**identity, "phase": name}
        resume = load_checkpoint(path, expect=ident) if args.resume is not None and path.exists() else None
        with resumable(resume_command(PROG, args, run_dir)):
            return ad.train_online(meth, model, (X, y, Xv, yv), args.steps, args.batch, args.seed, args.eval_every,
                                   eval_train_n=args.eval_train_n, progress=args.progress, eval_batch=args.eval_batch,
                                   checkpoint=path, checkpoint_every=args.checkpoint_every, identity=ident,
                                   resume=resume, stop_after=stop, **kw)

    def stopped(name, done):
        print(f"{name}: stopped after {done} of {args.steps} steps; continue with --resume {run_dir}")
        return {"run_dir": str(run_dir), "completed": False, "phase": name, "steps_done": done}

    t0 = time.perf_counter()
    res, run = phase("adaptive", method, args.stop_after, desc=args.method)
    timings["this_process_train_s"] = time.perf_counter() - t0
    if res["steps_done"] < args.steps:
        return stopped("adaptive", res["steps_done"])
    timings.update({f"adaptive_{k}": v for k, v in res.pop("timings").items()})
    timings["train_s"] = timings.pop("adaptive_spent_s")        # the whole run, also before a resume
    metrics = dict(res)
    test_loss, test_err = run.evaluate(ds.test.X, ds.test.y, args.eval_batch)
    metrics.update(final_metrics(res, test_loss, test_err, len(ds.test) > 0), n_params=model.layout.size)
    if "n_projected" in run.S:
        metrics["n_projected"] = int(run.state()["n_projected"])
    base, base_name = None, BASELINE_OF.get(args.method, "sgd")
    if args.baseline:
        stop = stop_for_baseline(args.stop_after, args.steps)
        if stop is not None and stop <= 0:
            return stopped("baseline", 0)
        t0 = time.perf_counter()
        base, brun = phase("baseline", baseline_method(args, model.layout, ad, start=start), stop,
                           record_hypers=False, desc=base_name)
        timings["this_process_baseline_s"] = time.perf_counter() - t0
        if base["steps_done"] < args.steps:
            return stopped("baseline", base["steps_done"])
        timings.update({f"baseline_{k}": v for k, v in base.pop("timings").items()})
        timings["baseline_s"] = timings.pop("baseline_spent_s")
        bl, be = brun.evaluate(ds.test.X, ds.test.y, args.eval_batch)
        metrics.update(baseline_metrics(base, base_name, bl, be, len(ds.test) > 0, metrics))
        if timings.get("baseline_step_s_mean"):
            timings["step_overhead"] = timings["adaptive_step_s_mean"] / timings["baseline_step_s_mean"] - 1.0
    t0 = time.perf_counter()
    metrics["plots"] = try_plot(run_dir, res, base, args.method, base_name,
                                f"{ds.name}, {len(ds.train)} training examples, {args.steps} steps")
    timings["plots_s"] = time.perf_counter() - t0
    conf = {k: v for k, v in vars(args).items() if not callable(v) and not k.startswith("_")}
    if start:
        conf["hypers_start"] = jsonable_start(start)
    conf.update(model_description=model.describe(), method_config=method.config, data=ds.describe(),
                floatX=str(theano.config.floatX), device=str(theano.config.device))
    argv = invocation("gpu_ver", getattr(args, "_argv", ["adaptive", *sys.argv[1:]]))
    write_results(run_dir, argv, conf, metrics, timings,
                  packages=("numpy", "scipy", "theano", "matplotlib"))
    line = (f"{args.method}: final train loss {metrics['final_train_loss']:.4f}, val loss "
            f"{metrics['final_val_loss']:.4f}, val error {metrics['final_val_error']:.4f}")
    if base is not None:
        line += (f"; {base_name}: train loss {base['train_loss'][-1]:.4f}, val loss {base['val_loss'][-1]:.4f}, "
                 f"val error {base['val_error'][-1]:.4f}")
    print(line)
    print(f"results: {Path(run_dir) / 'results.json'}")
    return {"run_dir": str(run_dir), "config": conf, "metrics": metrics, "timings": timings, "run": run}


def run_adaptive_command(args) -> int:
    """``run_adaptive`` for ``gpu_ver.__main__``'s registry (``Command.run`` returns an exit status)."""
    run_adaptive(args)
    return 0


def main(argv=None):
    """Stand-alone entry (``python -m gpu_ver.cli.adaptive``) until ``gpu_ver.__main__`` registers it."""
    from shared.errors import HPOError  # noqa: PLC0415

    p = add_adaptive_arguments(argparse.ArgumentParser(prog="python -m gpu_ver adaptive", description=__doc__,
                                                       formatter_class=argparse.RawDescriptionHelpFormatter))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args._argv = ["adaptive", *argv]
    try:
        run_adaptive(args)
    except HPOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
