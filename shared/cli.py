"""Backend-neutral pieces of the command lines of ``cpu_ver`` and ``gpu_ver``.

Both front ends call these before any work starts, so that bad input ends with one
``error: ...`` line (exit status 2) instead of a traceback or a half-made run:

* ``check_options``: one table of range checks for the options both backends share
  under the same names (``--iters``, ``--batch``, ``--K``, ``--n-train``, ``--clip``,
  ``--tol``, ``--image-size`` ...), applied to whichever of them a command has;
* ``parse_groups``: the ``--hypers`` list;
* ``resolve_run_folder``: the one run folder of an invocation, decided once (the
  default name has a time stamp, so computing it twice gives two folders), checked
  to be writable, and refused when it holds another run's files (unless
  ``--overwrite``) or, for ``--resume``, when it holds no checkpoint;
  ``prepare_run_folder`` stores it in ``args.out``; ``add_resume_argument``: one
  ``--resume [RUN_FOLDER]`` for every command that checkpoints;
* ``option_identity``: what a checkpoint records of the options, one key per option, so
  that a refused resume names the option that differs;
* ``invocation``: the command line as a person would paste it (``python -m cpu_ver ...``);
* ``run_guarded``: the common ending (``error: ...`` and 2; quiet on a closed stdout).

Nothing here imports either backend.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from shared.errors import ConfigError

# ---------------------------------------------------------------------------
# Option ranges. name -> (test, what the value must be). Names are argparse
# destinations; a command checks only the ones it has. ``None`` means "not given"
# and is always accepted (the command's default applies).


def _int_at_least(lo):
    return (lambda v: int(v) == v and v >= lo), f"an integer >= {lo}"


def _finite(test, what):
    return (lambda v: isinstance(v, (int, float)) and math.isfinite(v) and test(v)), what


_POSITIVE_INT = _int_at_least(1)
_COUNT = _int_at_least(0)
_POSITIVE = _finite(lambda v: v > 0, "a finite number > 0")
_NON_NEGATIVE = _finite(lambda v: v >= 0, "a finite number >= 0")
_IMAGE_SIZE = ((lambda v: int(v) == v and v >= 4 and v % 4 == 0),
               "a positive multiple of 4 (DenseNet halves the image twice)")

OPTION_RULES = {
    "iters": _POSITIVE_INT, "densenet_iters": _POSITIVE_INT, "steps": _POSITIVE_INT, "epochs": _POSITIVE_INT,
    "batch": _POSITIVE_INT, "eval_batch": _POSITIVE_INT, "eval_every": _POSITIVE_INT,
    "eval_train_n": _POSITIVE_INT, "val_chunk": _POSITIVE_INT, "hyper_every": _POSITIVE_INT,
    "K": _POSITIVE_INT, "n_train": _POSITIVE_INT,
    "n_val": _COUNT, "n_test": _COUNT, "meta_iters": _COUNT, "checkpoint_every": _COUNT, "stop_after": _COUNT,
    "clip": _POSITIVE, "clip_value": _POSITIVE, "eps": _POSITIVE, "meta_lr": _NON_NEGATIVE,
    "tol": _NON_NEGATIVE, "image_size": _IMAGE_SIZE,
}


def flag(name: str) -> str:
    """The command-line spelling of an argparse destination (``n_train`` -> ``--n-train``)."""
    return "--" + name.replace("_", "-")


def check_options(args) -> None:
    """ConfigError naming the first option of ``args`` outside its range (``OPTION_RULES``),
    then the cross-checks: ``--K`` at most ``--iters`` (one checkpoint segment per step at most)."""
    values = vars(args)
    for name, (ok, what) in OPTION_RULES.items():
        v = values.get(name)
        if v is not None and not ok(v):
            raise ConfigError(f"{flag(name)} must be {what}, got {v!r}")
    K, T = values.get("K"), values.get("iters")
    if K is not None and T is not None and K > T:
        raise ConfigError(f"--K {K} exceeds --iters {T}: at most one checkpoint segment per training step "
                          f"(--K {T} already stores every step)")


def parse_groups(text, allowed) -> tuple:
    """The ``--hypers`` groups, in order; ConfigError for an empty list or an unknown name."""
    groups = tuple(g.strip() for g in str(text).split(",") if g.strip())
    if not groups:
        raise ConfigError(f"--hypers {text!r} names no group; choose from {','.join(allowed)}")
    bad = [g for g in groups if g not in allowed]
    if bad:
        raise ConfigError(f"--hypers: unknown group {bad[0]!r}; choose from {','.join(allowed)}")
    return groups


def option_identity(config: dict) -> dict:
    """``{"option.<name>": value}`` for every entry of ``config``: what a checkpoint records
    and a resumed run must match, one key per option, so that a refusal names the
    option that differs (``records.load_checkpoint``) instead of two hashes."""
    return {f"option.{k}": v for k, v in sorted(config.items())}


# ---------------------------------------------------------------------------
# Command lines

EXIT_BROKEN_PIPE = 141      # 128 + SIGPIPE, what a shell reports for a reader that went away


def run_guarded(work) -> int:
    """``work()``'s exit status, with the two endings every command shares: an ``HPOError``
    prints one ``error: ...`` line and gives 2; a closed standard output (``... | head -1``)
    ends quietly with ``EXIT_BROKEN_PIPE`` instead of a BrokenPipeError traceback."""
    import sys  # noqa: PLC0415

    from shared.errors import HPOError  # noqa: PLC0415

    try:
        return int(work() or 0)
    except HPOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # later writes (and the interpreter's final flush) go nowhere instead of failing again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def invocation(package: str, argv) -> list:
    """The command as a person would type it again: ``python -m <package> <argv...>``."""
    return ["python", "-m", package, *[str(a) for a in argv]]


# ---------------------------------------------------------------------------
# Run folders

def record_argv(package: str, args) -> list:
    """The command line of a parsed run for command.txt and results.json (``invocation`` of
    the arguments ``main`` received, kept on ``args._argv``; the process's when absent)."""
    import sys  # noqa: PLC0415

    return invocation(package, getattr(args, "_argv", sys.argv[1:]))


def config_of(args) -> dict:
    """The options of a parsed run as results.json's ``config``: every public entry that is
    not a function (``func``, lazily bound commands)."""
    return {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "func" and not callable(v)}


def check_writable_folder(folder, what: str) -> Path:
    """ConfigError unless ``folder`` is (or can be created as) a writable folder.

    ``what`` names the setting in the message (``--out``, ``HPO_THEANO_CACHE``). The
    nearest existing ancestor must be a writable folder; nothing is created here.
    """
    folder = Path(folder)
    anc = folder.absolute()
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ConfigError(f"{what} {folder}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {folder}: {anc} is not writable (permissions or a read-only file system)")
    return folder


def _resume_folder(resume, out) -> Path:
    """The folder ``--resume`` names: its value, or ``--out`` for a bare ``--resume``."""
    if resume is True or resume == "":
        if not out:
            raise ConfigError("--resume needs the run folder: --resume RUN_FOLDER (or --resume --out RUN_FOLDER)")
        return Path(out)
    d = Path(resume)
    d = d.parent if d.is_file() else d
    if out and Path(out).absolute() != d.absolute():
        raise ConfigError(f"--out {out} differs from the folder being resumed ({d}); a run continues in its "
                          "own folder (give --resume RUN_FOLDER alone)")
    return d


def resolve_run_folder(out, command: str, *, resume=None, checkpoint: str | None = None, overwrite=False,
                       root="runs") -> Path:
    """The one run folder of a command, checked before any work; nothing is created.

    A new run (``resume`` None or False) uses ``out``, default ``root/<command>-<time>``;
    a folder that already holds run files (``run_files``) is refused unless
    ``overwrite``, so two runs' files never mix. A resumed run (``resume`` True or "":
    the folder ``out``; a string: that folder, or the folder of that file) continues in
    its own folder, which must hold ``checkpoint``. The folder must be writable.
    """
    if resume is not None and resume is not False:
        d = _resume_folder(resume, out)
        if checkpoint is None:
            raise ConfigError(f"{command} has no checkpoint to resume from")
        if not (d / checkpoint).is_file():
            raise ConfigError(f"--resume {d}: no {checkpoint} there (nothing to continue)")
        return check_writable_folder(d, "--out")
    from shared.records import default_run_dir, run_files  # noqa: PLC0415 (records imports numpy)

    d = Path(out) if out else default_run_dir(command, root)
    if d.exists() and not d.is_dir():
        raise ConfigError(f"--out {d}: a file is in the way")
    held = run_files(d)
    if held and not overwrite:
        raise ConfigError(f"--out {d} already holds another run ({', '.join(held[:3])}"
                          f"{' ...' if len(held) > 3 else ''}): choose another --out, continue it with --resume "
                          "where the command has one, or pass --overwrite to replace it")
    return check_writable_folder(d, "--out")


def prepare_run_folder(args, command: str, checkpoint: str | None = None) -> Path:
    """Resolve ``args.out`` once (``resolve_run_folder`` with ``args.resume`` and
    ``args.overwrite`` where the command has them) and store it back in ``args.out``,
    so that every file of the run goes to that folder. With ``--overwrite`` the
    earlier run's files are removed when the run makes its folder
    (``records.make_run_dir``, after the command's own checks), so that the two runs'
    files never mix and a run refused for bad input loses nothing."""
    from shared.records import replace_on_first_use  # noqa: PLC0415

    resume = getattr(args, "resume", None)
    overwrite = bool(getattr(args, "overwrite", False))
    d = resolve_run_folder(args.out, command, resume=resume, checkpoint=checkpoint, overwrite=overwrite)
    if overwrite and (resume is None or resume is False):
        replace_on_first_use(d)
    args.out = str(d)
    return d


def add_resume_argument(add) -> None:
    """``--resume [RUN_FOLDER]`` (``add``: a parser's add_argument): the same convention in
    every command that checkpoints: continue the run in RUN_FOLDER, or in ``--out`` when
    given alone; the run continues in its own folder."""
    add("--resume", nargs="?", const="", default=None, metavar="RUN_FOLDER",
        help="continue the run in RUN_FOLDER (or in --out when given alone); the run continues in its folder")


def add_overwrite_argument(add) -> None:
    """``--overwrite`` (``add``: a parser's add_argument)."""
    add("--overwrite", action="store_true",
        help="replace an earlier run's files in --out (refused otherwise, so two runs never mix)")


def add_l2_on_argument(add) -> None:
    """``--l2-on all|weights`` (``add``: a parser's add_argument): which parameters L2 covers
    (``shared.coverage``), the same option in every command that takes L2."""
    from shared.coverage import COVERAGES, DEFAULT

    add("--l2-on", default=DEFAULT, choices=COVERAGES,
        help="parameters that L2 covers: all (default) or weights (dense and convolution weight matrices; "
             "biases and batch-norm scales/shifts get L2 fixed at 0 and are not tuned)")
