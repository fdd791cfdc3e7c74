"""The model, data, training and hyperparameter options of ``python -m gpu_ver drmad``
and ``hypergrad``, and the problem they describe (``build_problem``).

This module does not import Theano at the top, so the parser can be built before
``config.load`` applies --device/--floatX; ``build_problem`` imports ``gpu_ver.problem``
(and with it Theano) lazily.
"""
from __future__ import annotations

from shared.cli import add_l2_on_argument, parse_groups
from shared.errors import ConfigError

MLP_DATASETS = ("digits", "mnist", "mnist-t10k", "synthetic")
IMAGE_DATASETS = ("synthetic-images", "cifar10")


HVP_CHOICES, HVP_DEFAULT = ("ror", "rop"), "ror"   # gpu_ver.models.HVP_METHODS / DEFAULT_HVP (tested equal)


def add_hvp_argument(p):
    """``--hvp``: the reverse step's Hessian-vector product (``gpu_ver.models.symbolic_grad_and_hvp``)."""
    p.add_argument("--hvp", default=HVP_DEFAULT, metavar="ror|rop",
                   help="Hessian-vector product of the reverse step: ror (reverse over reverse, the default) or "
                        "rop (forward over reverse); equal to rounding")


def check_hvp_option(args) -> None:
    """ConfigError (one line, exit 2) for an ``--hvp`` that is not ror or rop."""
    if getattr(args, "hvp", HVP_DEFAULT) not in HVP_CHOICES:
        raise ConfigError(f"--hvp must be one of {', '.join(HVP_CHOICES)}, got {args.hvp!r}")


def add_problem_arguments(p, iters=100, batch=100):
    """Options shared by ``drmad`` (model, data, training, hyperparameters, DrMAD variant)."""
    p.add_argument("--model", default="mlp", choices=("mlp", "densenet"))
    p.add_argument("--dataset", default=None, choices=MLP_DATASETS + IMAGE_DATASETS,
                   help="default: digits for the MLP, synthetic-images for DenseNet")
    p.add_argument("--data-dir", default=None, help="folder with the MNIST / CIFAR-10 files")
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-val", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--layers", default=None, help="MLP sizes, e.g. 64,50,10 (default input,50,classes)")
    p.add_argument("--activation", default=None, choices=("tanh", "relu", "softplus"),
                   help="default tanh (MLP), relu (DenseNet)")
    p.add_argument("--depth", type=int, default=7, help="DenseNet depth 3n + 4")
    p.add_argument("--growth", type=int, default=4, help="DenseNet growth rate")
    p.add_argument("--image-size", type=int, default=8, help="synthetic-images: height = width")
    p.add_argument("--iters", type=int, default=iters, help="training steps T")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--lr", type=float, default=0.3, help="initial learning rate (> 0)")
    p.add_argument("--momentum", type=float, default=0.9, help="initial momentum in (0, 1)")
    p.add_argument("--l2", type=float, default=1e-4, help="initial L2 strength (> 0)")
    p.add_argument("--l2-shape", default="unit", choices=("scalar", "block", "unit", "param"),
                   help="per-unit (default), per-layer/block, per-parameter or one strength")
    add_l2_on_argument(p.add_argument)
    p.add_argument("--lr-shape", default="scalar", choices=("scalar", "block", "iter", "iter_block"))
    p.add_argument("--momentum-shape", default="scalar", choices=("scalar", "block", "iter", "iter_block"))
    p.add_argument("--hypers", default="l2", help="tuned groups, comma-separated from l2,lr,momentum,init_scale")
    p.add_argument("--hypers-from", default=None, metavar="RUN_DIR|FILE",
                   help="start from the hyperparameters a run saved (RUN_DIR/hypers.json, or a hypers.npz/json "
                        "file); they replace --lr, --momentum, --l2 and the --*-shape options")
    p.add_argument("--K", type=int, default=1, help="checkpoint segments (1 = DrMAD, T = every step stored)")
    p.add_argument("--grid", default="t/T", choices=("t/T", "cumlr"))
    p.add_argument("--velocity", default="reconstruct", choices=("reconstruct", "ignore"))
    add_hvp_argument(p)
    p.add_argument("--val-chunk", type=int, default=1000,
                   help="validation split evaluated in near-equal chunks of at most this size")


def build_problem(args):
    """(problem, hypers, data description) from parsed options; ConfigError for bad input."""
    check_hvp_option(args)
    from gpu_ver import models as M  # noqa: PLC0415 (loads Theano)
    from gpu_ver import problem as P  # noqa: PLC0415
    from shared import datasets  # noqa: PLC0415
    from shared.mlp_spec import parse_layers  # noqa: PLC0415

    dataset = args.dataset or ("digits" if args.model == "mlp" else "synthetic-images")
    if args.model == "mlp" and dataset not in MLP_DATASETS:
        raise ConfigError(f"--dataset {dataset} needs --model densenet; the MLP takes {', '.join(MLP_DATASETS)}")
    if args.model == "densenet" and dataset not in IMAGE_DATASETS:
        raise ConfigError(f"--dataset {dataset} has no images; DenseNet takes {', '.join(IMAGE_DATASETS)}")
    if dataset == "synthetic-images":
        from gpu_ver.train import synthetic_images  # noqa: PLC0415

        data = synthetic_images(args.n_train or 256, 64 if args.n_val is None else args.n_val,
                                64 if args.n_test is None else args.n_test, size=args.image_size, seed=args.seed)
    else:
        data = datasets.load(dataset, args.data_dir, args.n_train, args.n_val, args.n_test, args.seed)
    act = args.activation or ("tanh" if args.model == "mlp" else "relu")
    if args.model == "mlp":
        sizes = parse_layers(args.layers) if args.layers else (data.n_features, 50, data.n_classes)
        model = M.MLP(sizes, act)
    else:
        model = M.DenseNet(args.depth, args.growth, n_classes=data.n_classes, input_shape=data.input_shape,
                           activation=act)
    if not 0 < args.momentum < 1:
        raise ConfigError(f"--momentum must lie in (0, 1), got {args.momentum}")
    if not (args.lr > 0 and args.l2 > 0):
        raise ConfigError(f"--lr and --l2 must be positive (they are tuned in log space), got {args.lr}, {args.l2}")
    groups = parse_groups(args.hypers, P.GROUPS)
    problem = P.Problem.from_dataset(model, data, n_iters=args.iters, batch_size=args.batch,
                                     batch_seed=args.seed, init_seed=args.seed, val_chunk=args.val_chunk)
    hypers = problem.hypers(lr=args.lr, momentum=args.momentum, l2=args.l2, groups=groups, l2_shape=args.l2_shape,
                            lr_shape=args.lr_shape, momentum_shape=args.momentum_shape, l2_on=args.l2_on)
    if args.hypers_from:
        from shared.hyperparams import load_for_run  # noqa: PLC0415

        hypers = load_for_run(args.hypers_from, problem.layout, args.iters, groups, l2_on=args.l2_on)
        P.check_shapes(*(hypers.group(g).shape for g in ("l2", "lr", "momentum")))
    return problem, hypers, data.describe()
