"""``python -m gpu_ver <command>``: the Theano backend's command line.

Commands live in the registry ``COMMANDS`` (name -> ``Command``). To add one,
write ``add_<name>_arguments(parser)`` and ``run_<name>(args) -> int`` in a command
module ``gpu_ver/cli/<name>.py`` and add an entry; import Theano-using modules inside ``run_<name>`` only (``main`` calls
``config.load`` with ``--device``/``--floatX`` first, and Theano's flags cannot
change after import).

Common options of every command: ``--seed``, ``--out`` (default
``runs/<command>-<time>``), ``--device auto|cpu|cuda``, ``--floatX
float64|float32`` (default: the command's, overridden by ``HPO_FLOATX``).
An ``HPOError`` (bad option, data problem, non-finite loss) ends the process
with a one-line ``error: ...`` on stderr and exit status 2; Ctrl-C with 130.

``info`` prints the Theano device, BLAS, compiler and compile cache; it writes
``results.json`` only when ``--out`` is given. ``summarize RUN_DIR...`` prints one
table of earlier runs (``shared/summary.py``, the same as ``cpu_ver summarize``),
writes ``summary.csv`` only when ``--out`` is given, and never imports Theano.
``sweep SPEC`` (``shared/sweep_cli.py``, the same command as ``cpu_ver sweep``) runs a sweep
spec's runs on Dask, each as its own process; it never imports Theano either.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

from gpu_ver import config
from shared import cli, interrupt
from shared.errors import ConfigError

PROG = "python -m gpu_ver"


@dataclass(frozen=True)
class Command:
    help: str
    add_args: Callable          # (argparse.ArgumentParser) -> None
    run: Callable               # (argparse.Namespace) -> int
    default_floatX: str = "float64"
    checkpoint: str | None = None       # the file --resume continues from (None: not resumable)
    run_folder: bool = True             # writes a run folder even without --out
    theano: bool = True                 # False: never loads Theano (no --device/--floatX/--seed, no cache check)
    own_folder: bool = False            # checks and writes its folder itself (sweep: its manifest)


def argv_record(args) -> list:
    """The command line for command.txt and results.json, as a person would paste it."""
    return cli.record_argv("gpu_ver", args)


def out_dir(args):
    """The run folder (``main`` resolved ``--out`` once, before the command ran)."""
    return args.out


# --------------------------------------------------------------------------- info
def add_info_args(p):
    p.add_argument("--json", action="store_true", help="print the information as JSON")


def run_info(args) -> int:
    d = config.info()
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        width = max(map(len, d))
        for k, v in d.items():
            print(f"{k:<{width}}  {v}")
    if args.out:
        from shared import records  # noqa: PLC0415

        records.write_results(args.out, argv_record(args), {"device": args.device, "floatX": args.floatX},
                              d, {})
    return 0


# --------------------------------------------------------------------------- train
def _bool(s):
    v = str(s).lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_train_args(p):
    p.add_argument("--model", default="densenet", choices=["densenet", "mlp"])
    p.add_argument("--depth", type=int, default=40, help="DenseNet depth L = 3n + 4 (6n + 4 with bottleneck)")
    p.add_argument("--growth", type=int, default=12, help="DenseNet growth rate k")
    p.add_argument("--bottleneck", action="store_true", help="BN-ReLU-conv1x1 to 4k before each 3x3 (DenseNet-B)")
    p.add_argument("--compression", type=float, default=1.0, help="theta in (0, 1] at transitions (DenseNet-C)")
    p.add_argument("--activation", default="relu", choices=["relu", "softplus", "tanh"])
    p.add_argument("--hidden", default="100", help="MLP hidden sizes, comma-separated")
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "synthetic-images"],
                   help="cifar10 (needs --data-dir) or synthetic-images (tiny CIFAR-format images)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-val", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--image-size", type=int, default=32, help="synthetic images: height = width")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--nesterov", type=_bool, default=True)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    cli.add_l2_on_argument(p.add_argument)
    p.add_argument("--hypers-from", default=None, metavar="RUN_DIR|FILE",
                   help="the base learning rate (a file whose lr has shape scalar) and the L2 strengths (shape "
                        "scalar, block, unit or param) a run saved for this layout; they replace --lr and "
                        "--weight-decay")
    p.add_argument("--augment", type=_bool, default=True, help="flips + translations (true/false)")
    p.add_argument("--eval-batch", type=int, default=500)
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: at the end)")
    cli.add_resume_argument(p.add_argument)
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (leaves a checkpoint)")
    p.add_argument("--no-progress", action="store_true")


def run_train(args) -> int:
    from gpu_ver import train  # noqa: PLC0415

    cfg = train.config_from_args(args)
    out = out_dir(args)
    resume = None if args.resume is None else out        # a run continues in its own folder
    with interrupt.resumable(interrupt.resume_argv(argv_record(args), ["--resume"], out=out)):
        res = train.train(cfg, out, argv_record(args), resume=resume, stop_after=args.stop_after,
                          progress=not args.no_progress)
    m = res["metrics"]
    print(f"{out}: {m['steps_done']}/{m['steps_total']} steps, final val error {m['final_val_error']}, "
          f"test error {m['final_test_error']}")
    return 0


def _lazy(module: str, name: str):
    """A function that imports ``module.name`` when first called (keeps Theano out of start-up)."""
    def call(*a, **kw):
        import importlib  # noqa: PLC0415
        return getattr(importlib.import_module(module), name)(*a, **kw)
    return call


# --------------------------------------------------------------------------- registry
COMMANDS: dict = {
    "info": Command("which Theano device, BLAS, compiler and cache are in use", add_info_args, run_info,
                    run_folder=False),
    "train": Command("train DenseNet (or an MLP) on CIFAR-10 with checkpoints", add_train_args, run_train,
                     default_floatX="float32", checkpoint="checkpoint.npz"),
    "drmad": Command("DrMAD hypergradients and meta-optimisation of L2 strengths (MLP or DenseNet)",
                     _lazy("gpu_ver.cli.drmad", "add_drmad_arguments"), _lazy("gpu_ver.cli.drmad", "run_drmad"),
                     checkpoint="checkpoint.npz"),
    "hypergrad": Command("one hypergradient of the validation loss: exact (reversible), DrMAD, or both with "
                         "their agreement", _lazy("gpu_ver.cli.hypergrad", "add_hypergrad_arguments"),
                         _lazy("gpu_ver.cli.hypergrad", "run_hypergrad")),
    "check": Command("finite-difference checks of this backend's hypergradients",
                     _lazy("gpu_ver.cli.check", "add_check_arguments"), _lazy("gpu_ver.cli.check", "run_check")),
    "adaptive": Command("online adaptation of learning rates and L2 strengths during training",
                        _lazy("gpu_ver.cli.adaptive", "add_adaptive_arguments"),
                        _lazy("gpu_ver.cli.adaptive", "run_adaptive_command"),
                        checkpoint="checkpoint-adaptive.npz"),
    "devcheck": Command("a GPU device against Theano's C backend: DenseNet gradient, HVP, training step, host ops",
                        _lazy("gpu_ver.devcheck", "add_devcheck_arguments"),
                        _lazy("gpu_ver.devcheck", "run_devcheck"), default_floatX="float32"),
    "crosscheck": Command("the same MLP problem through both backends",
                          _lazy("gpu_ver.cli.crosscheck", "add_crosscheck_arguments"),
                          _lazy("gpu_ver.cli.crosscheck", "run_crosscheck")),
}


def run_summarize(args) -> int:
    from shared.summarize_cli import run_summarize as run  # noqa: PLC0415

    return run(args, argv_record(args))


def _add_summarize_args(p):
    from shared.summarize_cli import add_summarize_arguments  # noqa: PLC0415

    add_summarize_arguments(p)


COMMANDS["summarize"] = Command("one table of several runs: the options that differ and their final figures "
                                "(CSV with --out)", _add_summarize_args, run_summarize,
                                run_folder=False, theano=False)


def run_sweep(args) -> int:
    from shared.sweep_cli import run_sweep as run  # noqa: PLC0415

    return run(args, argv_record(args))


def _add_sweep_args(p):
    from shared.sweep_cli import add_sweep_arguments  # noqa: PLC0415

    add_sweep_arguments(p)


COMMANDS["sweep"] = Command("run a sweep spec's runs on Dask (embedded cluster, a scheduler, or SLURM); table and "
                            "plots", _add_sweep_args, run_sweep, run_folder=False, theano=False, own_folder=True)


def checkpoint_file(command: str):
    """The file ``--resume`` of ``command`` continues from (None: the command does not resume)."""
    return COMMANDS[command].checkpoint


def add_common_args(p, cmd: Command):
    if cmd.own_folder:
        return
    if not cmd.theano:
        p.add_argument("--out", default=None,
                       help="write the command's files there (default: print only)" if not cmd.run_folder
                       else "output folder (default runs/<command>-<time>)")
        cli.add_overwrite_argument(p.add_argument)
        return
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default runs/<command>-<time>)")
    p.add_argument("--device", default=None, metavar="auto|cpu|cuda|opencl",
                   help=f"Theano device: auto (CUDA if present, else cpu), cpu, cuda, opencl, or e.g. cuda1, opencl0:1 (default ${config.ENV_DEVICE} or auto)")
    p.add_argument("--floatX", default=None, choices=list(config.FLOATX),
                   help=f"Theano float type (default ${config.ENV_FLOATX} or {cmd.default_floatX})")
    cli.add_overwrite_argument(p.add_argument)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Theano backend of the hyperparameter toolkit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        add_common_args(p, cmd)
        cmd.add_args(p)
    return parser


def _env_floatX():
    """``$HPO_FLOATX`` (None when unset); ConfigError naming the variable for a bad value."""
    v = os.environ.get(config.ENV_FLOATX)
    if v and v not in config.FLOATX:
        raise ConfigError(f"{config.ENV_FLOATX}={v} is not a float type; choose from {', '.join(config.FLOATX)}")
    return v or None


def _cache_setting() -> str:
    """How the message names the compile cache: the variable when set, else 'Theano compile cache'."""
    return config.ENV_CACHE if os.environ.get(config.ENV_CACHE) else "Theano compile cache"


def checkpoints(args) -> bool:
    """Whether the command checkpoints between steps (and so lets Ctrl-C, from its start
    to its last file, stop it at a step boundary): train, adaptive, drmad --meta-iters N."""
    if args.command == "drmad":
        return bool(args.meta_iters) and not args.memory_steps
    return args.command in ("train", "adaptive")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args._argv = argv
    cmd = COMMANDS[args.command]

    def work():
        cli.check_options(args)
        if cmd.theano:
            floatX = args.floatX or _env_floatX() or cmd.default_floatX
            cli.check_writable_folder(config.default_cache_dir(), _cache_setting())
        if not cmd.own_folder and (cmd.run_folder or args.out):
            cli.prepare_run_folder(args, args.command, cmd.checkpoint)
        if cmd.theano:
            config.load(device=args.device, floatX=floatX)
        return cmd.run(args)
    try:
        with interrupt.deferred() if checkpoints(args) else nullcontext():
            return cli.run_guarded(work)
    except KeyboardInterrupt as e:       # a checkpointing command stopped between two steps, or a hard stop
        return interrupt.report(e)


if __name__ == "__main__":
    sys.exit(main())
