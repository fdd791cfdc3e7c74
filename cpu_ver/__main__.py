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
from contextlib import nullcontext

from cpu_ver.cli import check as check_cmd, hypergrad as hypergrad_cmd, meta as meta_cmd
from cpu_ver.cli.problem import GROUPS, PACKAGES, add_problem_arguments, build, record_argv  # noqa: F401
from shared import cli
from shared.interrupt import deferred, report
from shared.online_cli import CHECKPOINTS

PROG = "python -m cpu_ver"
cmd_hypergrad, cmd_meta, cmd_check = hypergrad_cmd.cmd_hypergrad, meta_cmd.cmd_meta, check_cmd.cmd_check


def _common(p):
    p.add_argument("--seed", type=int, default=0, help="seed for data split, initial weights and batches")
    p.add_argument("--out", default=None, help="run folder (default runs/<command>-<time>)")
    cli.add_overwrite_argument(p.add_argument)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")




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
    _common(h), add_problem_arguments(h)
    h.add_argument("--method", default="exact", choices=("exact", "drmad", "fd", "all"))
    h.set_defaults(func=cmd_hypergrad)

    m = sub.add_parser("meta", help="meta-optimisation of hyperparameters (exact or DrMAD)")
    _common(m), add_problem_arguments(m)
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
CHECKPOINT = {"meta": meta_cmd.CHECKPOINT, "adaptive": CHECKPOINTS["adaptive"]}
# Commands that make a run folder only when --out is given (the others default to runs/<command>-<time>).
PRINT_ONLY = ("summarize",)
# Commands that check and write their folder themselves (the sweep folder and its manifest).
OWN_FOLDER = ("sweep",)


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
