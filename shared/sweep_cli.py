"""``sweep SPEC``: the command of both backends (``python -m cpu_ver sweep`` and ``python -m
gpu_ver sweep`` are the same command; a spec may run commands of either backend).

Order of work: the spec is read and expanded (``shared/sweep_spec.py``), every run's
options are parsed by its backend's own command-line parser and range checks, and the
sweep folder is checked against its manifest (``shared/sweep_manifest.py``), all before a
cluster starts or a file is written; bad input ends with one ``error: ...`` line, exit 2.
Then the runs execute on Dask (``shared/sweep_exec.py``), and the done runs are aggregated
into ``summary.csv`` and plots (``shared/sweep_aggregate.py``, ``shared/sweep_plots.py``).
The sweep folder gets ``results.json`` (the counts and the table) and ``command.txt`` like
every run folder. Exit status: 0 when every run is done, 1 when any failed, 130 after Ctrl-C
(rerun the same command to continue).

The backends' parsers are read through ``importlib`` by the backend's name (the spec's
``backend``); neither backend's algorithms, nor Theano, are imported.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from shared import cli
from shared.errors import ConfigError

HELP = "run a sweep spec's runs on Dask (embedded cluster, a scheduler, or SLURM); table and plots"
REPO = Path(__file__).resolve().parents[1]


def add_sweep_arguments(p) -> None:
    """The sweep's options (the backend adds none of its common ones)."""
    p.add_argument("spec", metavar="SPEC", help="sweep spec (TOML); a path, or relative to the repository "
                                                "(experiments/NAME.toml)")
    p.add_argument("--scale", default=None, help="one of the spec's [scales.NAME] (e.g. tiny, paper)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None,
                       help="embedded LocalCluster of N worker processes, one thread each (default: 2, or the "
                            "number of cores if fewer)")
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="an existing Dask scheduler, e.g. tcp://host:8786")
    where.add_argument("--slurm", default=None, metavar="queue=Q,jobs=N,walltime=HH:MM:SS",
                       help="dask-jobqueue SLURM jobs (one worker each); also cores=, memory=, account=, python=")
    p.add_argument("--retries", type=int, default=2, help="retries of a failed run before it is marked failed")
    p.add_argument("--out", default=None, help="sweep folder (default runs/sweep-<name>[-<scale>]); rerun into it "
                                               "to continue")
    p.add_argument("--extend", action="store_true", help="accept a spec that adds runs to the sweep folder's")
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N runs of the spec (a trial; --extend adds the rest later)")
    p.add_argument("--list", action="store_true", help="print the runs and their folders, run nothing")
    cli.add_overwrite_argument(p.add_argument)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--launch", default=None, choices=("zygote", "subprocess"),
                   help="how a worker starts each attempt: a fork of its zygote, a process that has imported "
                        "the backend once (default on Linux), or a fresh python subprocess (the default elsewhere)")
    one_line_errors(p)


def one_line_errors(p) -> None:
    """Usage errors of the sweep's parser ``p`` (an invalid choice, a missing SPEC, an unknown
    option) end as every other bad input does (``cli.run_guarded``): one ``error: ...`` line
    on stderr and exit status 2, without the usage text."""
    def error(message):
        p.exit(2, f"error: {message}\n")

    parse_known = p.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, extra = parse_known(args, namespace)
        if extra:
            error(f"unrecognized arguments: {' '.join(extra)}")
        return ns, extra

    p.error = error
    p.parse_known_args = parse_known_args


def find_spec(text: str) -> Path:
    """SPEC as given, or relative to the repository when it is not there (the README's
    ``experiments/NAME.toml`` from any folder); a bare NAME means experiments/NAME.toml."""
    p = Path(text)
    for c in (p, REPO / p, REPO / "experiments" / f"{text}.toml"):
        if c.is_file():
            return c
    return p


def _subparser(parser, command):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices.get(command), sorted(action.choices)


def backend_interface(backend: str) -> tuple:
    """``(parser, checkpoint_of)`` of a backend: its full command-line parser and the function
    naming the file a command's ``--resume`` continues from (None: not resumable)."""
    main = importlib.import_module(f"{backend}.__main__")
    return main.build_parser(), main.checkpoint_file


def check_runs(spec) -> dict:
    """Run id -> the task ``shared.sweep_exec.run_task`` executes, every run's options parsed
    by its backend's parser (and ``cli.check_options``) first. ConfigError naming the spec,
    the run and the option the backend refuses."""
    faces, tasks = {}, {}
    for r in spec.runs:
        if r.backend not in faces:
            faces[r.backend] = backend_interface(r.backend)
        parser, checkpoint_of = faces[r.backend]
        sub, names = _subparser(parser, r.command)
        where = f"{spec.path}: run {r.folder_name}"
        if sub is None or r.command == "sweep":
            raise ConfigError(f"{spec.path}: {r.backend} has no command {r.command!r} to sweep "
                              f"(choose from {', '.join(n for n in names if n != 'sweep')})")
        words = r.argv()
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                ns = parser.parse_args([r.command, *words, "--out", "x"])
        except SystemExit:
            msg = err.getvalue().strip().splitlines()
            raise ConfigError(f"{where}: {r.backend} {r.command}: "
                              f"{msg[-1].split('error: ', 1)[-1] if msg else 'options refused'}") from None
        try:
            cli.check_options(ns)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        if "--no-progress" in sub._option_string_actions:
            words = [*words, "--no-progress"]
        tasks[r.run_id] = {"backend": r.backend, "command": r.command, "argv": words,
                           "checkpoint": checkpoint_of(r.command)}
    return tasks


def _sweep_folder(args, spec) -> Path:
    if args.out:
        return Path(args.out)
    return Path("runs") / f"sweep-{spec.name}{'-' + spec.scale if spec.scale else ''}"


def _prepare(args):
    """Everything checked before work: ``(spec, folder, manifest, tasks)``."""
    from shared import sweep_manifest, sweep_spec  # noqa: PLC0415
    from shared.records import run_files  # noqa: PLC0415

    from shared import sweep_exec, sweep_zygote  # noqa: PLC0415

    for name, lo in (("workers", 1), ("retries", 0), ("limit", 1)):
        v = getattr(args, name)
        if v is not None and v < lo:
            raise ConfigError(f"--{name} must be an integer >= {lo}, got {v}")
    if args.launch == "zygote" and not sweep_zygote.available():
        raise ConfigError("--launch zygote needs fork and PR_SET_PDEATHSIG (Linux); use --launch subprocess")
    launch = args.launch or sweep_exec.default_launch()
    spec = sweep_spec.load(find_spec(args.spec), args.scale)
    if args.limit is not None:
        spec = dataclasses.replace(spec, runs=spec.runs[:args.limit])
    tasks = check_runs(spec)
    from shared.sweep_plots import check_plot  # noqa: PLC0415

    for i, plot in enumerate(spec.plots):
        check_plot(spec, i, plot)
    folder = cli.check_writable_folder(_sweep_folder(args, spec), "--out")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder}: a file is in the way")
    old = None if args.overwrite else sweep_manifest.read(folder)
    if old is not None:
        manifest = sweep_manifest.reconcile(old, spec, folder, extend=args.extend)
    else:
        held = [n for n in run_files(folder)] + (["runs/"] if (folder / sweep_manifest.RUNS_FOLDER).exists() else [])
        if held and not args.overwrite:
            raise ConfigError(f"--out {folder} holds files but no {sweep_manifest.MANIFEST_FILE} "
                              f"({', '.join(held[:3])}): choose another --out, or --overwrite to replace them")
        manifest = sweep_manifest.new(spec)
    for rid, t in tasks.items():
        t.update(folder=str((folder / manifest["runs"][rid]["folder"]).absolute()), cwd=os.getcwd(), launch=launch)
    return spec, folder, manifest, tasks


def _clear(folder: Path) -> None:
    """--overwrite: the earlier sweep's manifest, runs and summary files go (after every check)."""
    from shared import sweep_manifest  # noqa: PLC0415
    from shared.records import run_files  # noqa: PLC0415

    shutil.rmtree(folder / sweep_manifest.RUNS_FOLDER, ignore_errors=True)
    for name in [sweep_manifest.MANIFEST_FILE, *run_files(folder)]:
        (folder / name).unlink(missing_ok=True)


def _print_runs(spec, manifest, folder):
    for rid, e in manifest["runs"].items():
        argv = shlex.join(["python", "-m", e["backend"], e["command"], *spec_argv(e)])
        print(f"{e['state']:<8} {folder / e['folder']}\n         {argv}")


def spec_argv(e) -> list:
    from shared.sweep_spec import options_argv  # noqa: PLC0415

    return options_argv(e["options"])


def run_sweep(args, argv_record) -> int:
    """The ``sweep`` command (``argv_record``: the command line for command.txt)."""
    from shared import interrupt, records, sweep_aggregate, sweep_exec, sweep_manifest  # noqa: PLC0415

    slurm = sweep_exec.parse_slurm(args.slurm) if args.slurm else None
    spec, folder, manifest, tasks = _prepare(args)
    if args.list:
        _print_runs(spec, manifest, folder)
        return 0
    if args.overwrite:
        _clear(folder)
    folder = records.make_run_dir(folder)
    records.write_text_atomic(folder / records.COMMAND_FILE, shlex.join(argv_record) + "\n")
    workers = args.workers or min(2, os.cpu_count() or 1)
    counts = sweep_manifest.counts(manifest)
    print(f"sweep {spec.name}{' (' + spec.scale + ')' if spec.scale else ''}: {len(manifest['runs'])} runs, "
          f"{counts['done']} already done; folder {folder}")
    t0 = time.perf_counter()
    todo = len(manifest["runs"]) - counts["done"]
    if todo:
        try:
            zygotes = sweep_exec.zygote_backends({rid: t for rid, t in tasks.items()
                                                  if manifest["runs"][rid]["state"] != "done"})
            with interrupt.deferred(), \
                    sweep_exec.cluster(workers=workers, scheduler=args.scheduler, slurm=slurm, zygotes=zygotes) as client:
                manifest = sweep_exec.execute(client, folder, manifest, tasks, retries=args.retries,
                                              save=lambda m: sweep_manifest.write(folder, m),
                                              progress=args.progress, floor=slurm["jobs"] if slurm else 1)
        except KeyboardInterrupt:
            c = sweep_manifest.counts(manifest)
            print(f"\ninterrupted: {c['done']} of {len(manifest['runs'])} runs done, recorded in "
                  f"{sweep_manifest.path_of(folder)}. Continue with:\n  {shlex.join(argv_record)}",
                  file=sys.stderr)
            return interrupt.EXIT_CODE
    else:
        sweep_manifest.write(folder, manifest)
    seconds = time.perf_counter() - t0
    counts = sweep_manifest.counts(manifest)
    table = sweep_aggregate.aggregate(spec, folder, manifest)
    figures = sweep_aggregate.draw(spec, folder, manifest)
    records.write_results(folder, argv_record, {"spec": str(spec.path), "name": spec.name, "scale": spec.scale,
                                                "retries": args.retries, "workers": workers,
                                                "launch": next((t["launch"] for t in tasks.values()), None),
                                                "scheduler": args.scheduler, "slurm": slurm},
                          {"runs": counts, "failed": {e["folder"]: e["error"] for e in manifest["runs"].values()
                                                      if e["state"] == "failed"},
                           "table": table, "figures": figures}, {"sweep_s": seconds}, packages=("numpy",))
    print(f"{counts['done']} done, {counts['failed']} failed; summary: {folder / sweep_aggregate.SUMMARY_FILE}")
    return 1 if counts["failed"] else 0
