"""``summarize RUN_DIR...``: the command of both backends (``cpu_ver`` and ``gpu_ver``
register it under the same name; the table itself is ``shared/summary.py``).

It prints one table of the runs (the options that differ, then the final figures);
with ``--out DIR`` it also writes ``DIR/summary.csv`` and ``DIR/command.txt``. Without
``--out`` nothing is written (no run folder is made, as for ``gpu_ver info``). Every
RUN_DIR is read before anything is written, so a bad one ends with one
``error: ...`` line and leaves no file behind.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from shared.errors import ConfigError

SUMMARY_FILE = "summary.csv"
HELP = "one table of several runs: the options that differ and their final figures (CSV with --out)"


def add_summarize_arguments(p) -> None:
    """The command's own arguments (``--out`` and ``--overwrite`` come with every command)."""
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (each holds results.json)")


def run_summarize(args, argv_record) -> int:
    """Print the table of ``args.runs``; with ``args.out`` also write summary.csv there.

    ``argv_record``: the command line as a person would paste it (for command.txt)."""
    from shared import records, summary  # noqa: PLC0415

    if args.out:
        out = Path(args.out).absolute()
        for r in args.runs:
            if Path(r).absolute() in (out, out / records.RESULTS_FILE):
                raise ConfigError(f"--out {args.out} is one of the runs being summarized; choose another folder")
    columns, rows = summary.table(args.runs)          # every run read (and checked) first
    print(summary.format_table(columns, rows), end="")
    if args.out:
        d = records.make_run_dir(args.out)
        records.write_text_atomic(d / records.COMMAND_FILE, shlex.join(argv_record) + "\n")
        path = records.write_text_atomic(d / SUMMARY_FILE, summary.csv_text(columns, rows))
        print(f"summary: {path}")
    return 0
