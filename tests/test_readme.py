"""Every command line README.md shows in a code block runs, exits 0 and writes one run folder.

Command lines are the lines of README.md's indented code blocks, split at ``&&``, that
start with ``python -m``, ``.venv/bin/python -m`` or ``bash scripts/`` (the set-up and
test scripts themselves excepted: they install and run this suite). Each runs in a
fresh working folder without ``--out``, as a user would type it, so that ``runs/``
lands there; the options in ``OVERRIDES`` are appended (argparse keeps the last value)
to keep each run small. Every command line must have an entry, so a new README command
makes its author choose its test size here.

OVERRIDES, (package, command) -> options appended:

=========================  ===================================================================
cpu_ver meta               2 meta-iterations of 8 steps, MLP 64-12-10, 200 / 100 examples
cpu_ver hypergrad          8 steps, MLP 64-12-10, 200 / 100 examples
cpu_ver check              10 training steps in the check problem
cpu_ver adaptive           10 steps, 200 / 100 examples
gpu_ver info               nothing (writes no folder without --out: ``FOLDERS``)
gpu_ver train              1 epoch, 32 / 16 / 16 images of 8x8, batch 16, float64 (the type every
                           other test compiles in, so a worker's compile cache has most modules)
gpu_ver drmad              2 meta-iterations of 8 steps, MLP 64-12-10, 200 / 100 examples
cpu_ver sweep              the first 2 runs of the spec (``--limit 2``) on the default 2 workers
=========================  ===================================================================
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS_NOT_RUN = ("bash scripts/setup.sh", "bash scripts/test.sh")
MLP_TINY = ["--iters", "8", "--layers", "64,12,10", "--n-train", "200", "--n-val", "100", "--no-progress"]
OVERRIDES = {
    ("cpu_ver", "meta"): ["--meta-iters", "2", *MLP_TINY],
    ("cpu_ver", "hypergrad"): MLP_TINY,
    ("cpu_ver", "check"): ["--iters", "10", "--no-progress"],
    ("cpu_ver", "adaptive"): ["--steps", "10", "--n-train", "200", "--n-val", "100", "--no-progress"],
    ("gpu_ver", "info"): [],
    ("gpu_ver", "train"): ["--epochs", "1", "--n-train", "32", "--n-val", "16", "--n-test", "16", "--batch", "16",
                           "--eval-batch", "16", "--image-size", "8", "--floatX", "float64", "--no-progress"],
    ("gpu_ver", "drmad"): ["--meta-iters", "2", *MLP_TINY],
    ("cpu_ver", "sweep"): ["--limit", "2", "--no-progress"],
}
FOLDERS = {("gpu_ver", "info"): 0}      # run folders a command writes without --out (default 1)


def readme_commands(text: str) -> list:
    """The command lines of the indented code blocks of ``text`` (see the module docstring)."""
    out = []
    for line in text.splitlines():
        if not line.startswith("    ") or not line.strip():
            continue
        for part in line.strip().split("&&"):
            part = part.strip()
            if part.startswith(("python -m", ".venv/bin/python -m", "bash scripts/")) \
                    and not part.startswith(SCRIPTS_NOT_RUN):
                out.append(part)
    return out


COMMANDS = readme_commands((REPO / "README.md").read_text(encoding="utf-8"))


def _key(words):
    """(package, command) of a ``python -m package command ...`` line."""
    i = words.index("-m")
    return words[i + 1], words[i + 2]


def test_readme_has_the_main_job_and_a_gpu_train_line():
    assert ".venv/bin/python -m cpu_ver meta" in COMMANDS
    assert any(c.startswith(".venv/bin/python -m gpu_ver train --dataset synthetic-images") for c in COMMANDS)


def test_extraction():
    text = ("x\n\n    bash scripts/setup.sh && .venv/bin/python -m cpu_ver meta\n\n  python -m no\n"
            "    bash scripts/gpu/x.sh\n")
    assert readme_commands(text) == [".venv/bin/python -m cpu_ver meta", "bash scripts/gpu/x.sh"]


@pytest.mark.parametrize("line", COMMANDS, ids=[c.split(" -m ")[-1] for c in COMMANDS])
def test_readme_command_runs_and_writes_one_run_folder(line, tmp_path):
    words = shlex.split(line)
    if words[0] == "bash":
        argv, key = ["bash", str(REPO / words[1]), *words[2:]], None
    else:
        key = _key(words)
        assert key in OVERRIDES, f"README command {line!r} has no entry in OVERRIDES (tests/test_readme.py)"
        argv = [sys.executable, *words[1:], *OVERRIDES[key]]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, f"{line}: exit {p.returncode}\n{p.stderr[-3000:]}"
    runs = tmp_path / "runs"
    folders = sorted(runs.iterdir()) if runs.exists() else []
    assert len(folders) == FOLDERS.get(key, 1), (line, folders)
    for d in folders:
        names = {f.name for f in d.iterdir()}
        assert {"results.json", "command.txt"} <= names, (line, names)
        assert (d / "command.txt").read_text().startswith(f"python -m {key[0]} {key[1]}"), line
