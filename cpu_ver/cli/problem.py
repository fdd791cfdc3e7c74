"""The model, data, training and hyperparameter options of ``python -m cpu_ver hypergrad``
and ``meta``, the problem they describe (``build``), and the run record every command
of this backend writes (``finish``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from shared import cli
from shared.errors import ConfigError

PACKAGES = ("numpy", "scipy", "autograd")
GROUPS = ("l2", "lr", "momentum", "init_scale")
DEFAULT_MNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"


def record_argv(args) -> list:
    """The command line for command.txt and results.json, as a person would paste it."""
    return cli.record_argv("cpu_ver", args)


def add_problem_arguments(p, iters=100, batch=100):
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


def drmad_options(args):
    return {"K": args.K, "grid": args.grid, "velocity": args.velocity}


def run_config(args, data=None):
    cfg = cli.config_of(args)
    if data is not None:
        cfg["data"] = data.describe()
    return cfg


def finish(args, command, config, metrics, timings):
    from shared.records import write_results
    run_dir = Path(args.out)
    path = write_results(run_dir, record_argv(args), config, metrics, timings, packages=PACKAGES)
    print(f"results: {path}")
    return run_dir
