"""The command-line contract both backends share (``shared/cli.py``): option checks, the
one run folder per command, the recorded command line, refusals before any work.

Refusals are checked with the commands' work replaced by ``_no_work`` (a refusal that
came too late fails the test at once, instead of running the command), and with no run
folder left behind.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import cpu_ver.__main__ as cpu_main
import gpu_ver.__main__ as gpu_main
from shared import cli, records
from shared.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CPU_TINY = ["--layers", "64,12,10", "--iters", "8", "--batch", "50", "--n-train", "200", "--n-val", "100",
            "--no-progress"]


def _no_work(*_a, **_k):
    raise AssertionError("the command started its work before refusing its input")


@pytest.fixture
def no_work(monkeypatch):
    """Replace every command's work (both backends) by ``_no_work``."""
    for name in ("cmd_hypergrad", "cmd_meta", "cmd_check", "cmd_adaptive"):
        monkeypatch.setattr(cpu_main, name, _no_work)
    for name, cmd in list(gpu_main.COMMANDS.items()):
        monkeypatch.setitem(gpu_main.COMMANDS, name, dataclasses.replace(cmd, run=_no_work))


def _refused(main, argv, capsys, *words):
    """``main(argv)`` exits 2 with one ``error:`` line holding ``words``; returns the line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)
    return err


# --------------------------------------------------------------------------- option ranges (item 7, 10)
CPU_BAD = [
    (["hypergrad", "--K", "20", "--iters", "10"], ["--K 20", "--iters 10"]),
    (["hypergrad", "--K", "0"], ["--K", "0"]),
    (["meta", "--clip", "-1"], ["--clip", "-1"]),
    (["meta", "--clip", "0"], ["--clip", "0"]),
    (["check", "--tol", "-1"], ["--tol", "-1"]),
    (["hypergrad", "--n-train", "0"], ["--n-train", "0"]),
    (["hypergrad", "--iters", "0"], ["--iters", "0"]),
    (["adaptive", "--n-train", "0"], ["--n-train", "0"]),
    (["adaptive", "--clip", "-2"], ["--clip", "-2"]),
]
GPU_BAD = [
    (["drmad", "--K", "20", "--iters", "10"], ["--K 20", "--iters 10"]),
    (["drmad", "--meta-iters", "2", "--clip", "-1"], ["--clip", "-1"]),
    (["drmad", "--meta-iters", "2", "--clip", "0"], ["--clip", "0"]),
    (["check", "--tol", "-1"], ["--tol", "-1"]),
    (["train", "--dataset", "synthetic-images", "--n-train", "0"], ["--n-train", "0"]),
    (["train", "--dataset", "synthetic-images", "--image-size", "0"], ["--image-size", "0"]),
    (["drmad", "--model", "densenet", "--image-size", "6"], ["--image-size", "6"]),
    (["adaptive", "--image-size", "0"], ["--image-size", "0"]),
    (["drmad", "--n-train", "0"], ["--n-train", "0"]),
]


@pytest.mark.parametrize("argv, words", CPU_BAD, ids=[" ".join(a) for a, _ in CPU_BAD])
def test_cpu_option_out_of_range_is_refused_before_work(no_work, tmp_path, capsys, argv, words):
    out = tmp_path / "run"
    _refused(cpu_main.main, [*argv, "--out", str(out)], capsys, *words)
    assert not out.exists()


@pytest.mark.parametrize("argv, words", GPU_BAD, ids=[" ".join(a) for a, _ in GPU_BAD])
def test_gpu_option_out_of_range_is_refused_before_work(no_work, tmp_path, capsys, argv, words):
    out = tmp_path / "run"
    _refused(gpu_main.main, [*argv, "--out", str(out)], capsys, *words)
    assert not out.exists()


def test_same_option_same_check_in_both_backends():
    """An option both backends have is checked by one rule: the same message from either."""
    for argv in (["--K", "5", "--iters", "3"], ["--tol", "-1"], ["--clip", "0"], ["--n-train", "0"]):
        msgs = []
        for p in (cpu_main.parser(), gpu_main.build_parser()):
            cmd = "check" if "--tol" in argv else ("meta" if p.prog.endswith("cpu_ver") else "drmad")
            with pytest.raises(ConfigError) as e:
                cli.check_options(p.parse_args([cmd, *argv]))
            msgs.append(str(e.value))
        assert msgs[0] == msgs[1], msgs


def test_empty_hypers_names_the_problem():
    with pytest.raises(ConfigError, match="names no group"):
        cli.parse_groups("", ("l2", "lr"))
    with pytest.raises(ConfigError, match="unknown group 'lx'"):
        cli.parse_groups("l2,lx", ("l2", "lr"))
    assert cli.parse_groups(" l2, lr ", ("l2", "lr")) == ("l2", "lr")


def test_empty_hypers_from_the_command_line_names_the_problem(tmp_path, capsys):
    _refused(cpu_main.main, ["hypergrad", "--hypers", "", "--out", str(tmp_path / "c"), *CPU_TINY], capsys,
             "--hypers", "names no group")
    _refused(gpu_main.main, ["drmad", "--hypers", "", "--out", str(tmp_path / "g"), *CPU_TINY], capsys,
             "--hypers", "names no group")
    assert not (tmp_path / "c").exists() and not (tmp_path / "g").exists()


def test_hypergrad_with_no_training_examples_names_the_option(capsys, tmp_path):
    _refused(cpu_main.main, ["hypergrad", "--n-train", "0", "--out", str(tmp_path / "r")], capsys, "--n-train")


def test_help_cites_no_missing_file():
    text = cpu_main.parser().format_help() + gpu_main.build_parser().format_help()
    for name in set(re.findall(r"[\w/.-]+\.md", text)):
        assert (REPO / name).exists(), f"--help cites {name}, which is not in the repository"


def test_bad_floatx_variable_is_named(no_work, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HPO_FLOATX", "float16")
    err = _refused(gpu_main.main, ["check", "--out", str(tmp_path / "r")], capsys, "HPO_FLOATX", "float16")
    assert "--floatX" not in err


# --------------------------------------------------------------------------- dataset names (item 3)
def _dataset_choices(parser, command):
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return next(a for a in sub._actions if a.dest == "dataset").choices


def test_one_name_for_synthetic_images_in_every_gpu_command():
    p = gpu_main.build_parser()
    for command in ("train", "drmad", "adaptive"):
        choices = _dataset_choices(p, command)
        assert "synthetic-images" in choices, (command, choices)
        # "synthetic" is the Gaussian clusters of shared.datasets wherever it appears
        assert "synthetic" not in choices or command == "drmad", (command, choices)


# --------------------------------------------------------------------------- run folders (items 1, 5, 6, 9)
def test_out_under_a_file_is_refused_before_the_table_is_computed(no_work, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for main, cmd in ((cpu_main.main, "check"), (cpu_main.main, "hypergrad"), (gpu_main.main, "check")):
        _refused(main, [cmd, "--out", str(blocker / "run")], capsys, "--out", "is a file")
        _refused(main, [cmd, "--out", str(blocker)], capsys, "--out", "file")
    assert blocker.read_text() == "x"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_out_is_refused(no_work, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _refused(cpu_main.main, ["check", "--out", str(ro / "run")], capsys, "not writable")
    finally:
        ro.chmod(0o755)


def test_unwritable_theano_cache_is_refused_before_work(no_work, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("HPO_THEANO_CACHE", str(blocker / "cache"))
    _refused(gpu_main.main, ["check", "--out", str(tmp_path / "r")], capsys, "HPO_THEANO_CACHE", "is a file")
    assert not (tmp_path / "r").exists()


def test_another_runs_folder_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert cpu_main.main(["hypergrad", "--out", str(out), *CPU_TINY]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    _refused(cpu_main.main, ["meta", "--out", str(out), "--meta-iters", "1", *CPU_TINY], capsys,
             "already holds another run", "--overwrite")
    _refused(gpu_main.main, ["drmad", "--out", str(out)], capsys, "already holds another run")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # asked to: the earlier run's files go, the new run's files alone remain
    assert cpu_main.main(["meta", "--out", str(out), "--meta-iters", "1", "--overwrite", *CPU_TINY]) == 0
    assert json.loads((out / "results.json").read_text())["command"][3] == "meta"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["checkpoint.npz", "command.txt", "hyperparameters.png", "hypers.json", "hypers.npz",
         "learning_curves.png", "results.json", "schedules.png"])


def test_resume_without_a_checkpoint_creates_nothing(tmp_path, capsys):
    out = tmp_path / "nothing"
    _refused(cpu_main.main, ["meta", "--resume", "--out", str(out), *CPU_TINY], capsys, "no checkpoint.npz")
    assert not out.exists()
    _refused(cpu_main.main, ["meta", "--resume", *CPU_TINY], capsys, "--resume needs the run folder")


def test_resume_with_other_options_names_them(tmp_path, capsys):
    out = tmp_path / "m"
    assert cpu_main.main(["meta", "--out", str(out), "--meta-iters", "1", *CPU_TINY]) == 0
    capsys.readouterr()
    _refused(cpu_main.main, ["meta", "--resume", str(out), "--meta-iters", "2", *CPU_TINY, "--lr", "0.2"], capsys,
             "option.lr", "0.3", "0.2")


def test_one_resume_convention_for_every_command(tmp_path):
    """``--resume RUN_FOLDER`` (or ``--resume --out RUN_FOLDER``) continues in that folder;
    another ``--out`` is refused; the same for meta, drmad, train and adaptive."""
    d = tmp_path / "run"
    d.mkdir()
    for ckpt in ("checkpoint.npz", "checkpoint-adaptive.npz"):
        (d / ckpt).write_bytes(b"")
        assert cli.resolve_run_folder(None, "x", resume=str(d), checkpoint=ckpt) == d
        assert cli.resolve_run_folder(str(d), "x", resume=str(d), checkpoint=ckpt) == d
        assert cli.resolve_run_folder(str(d), "x", resume="", checkpoint=ckpt) == d
        assert cli.resolve_run_folder(None, "x", resume=str(d / ckpt), checkpoint=ckpt) == d
        with pytest.raises(ConfigError, match="differs from the folder being resumed"):
            cli.resolve_run_folder(str(tmp_path / "other"), "x", resume=str(d), checkpoint=ckpt)
    for parser, commands in ((cpu_main.parser(), ("meta", "adaptive")),
                             (gpu_main.build_parser(), ("train", "drmad", "adaptive"))):
        for command in commands:
            assert parser.parse_args([command, "--resume", str(d)]).resume == str(d)
            assert parser.parse_args([command, "--resume"]).resume == ""


def test_default_folder_is_decided_once(tmp_path, monkeypatch):
    """Without --out, every file of a meta run lands in one runs/meta-<time> folder."""
    monkeypatch.chdir(tmp_path)
    assert cpu_main.main(["meta", "--meta-iters", "1", *CPU_TINY]) == 0
    folders = list((tmp_path / "runs").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("meta-")
    assert {"checkpoint.npz", "results.json", "command.txt", "learning_curves.png"} <= {
        p.name for p in folders[0].iterdir()}


# --------------------------------------------------------------------------- command.txt (item 2)
def test_cpu_command_txt_can_be_pasted(tmp_path):
    out = tmp_path / "h"
    p = subprocess.run([sys.executable, "-m", "cpu_ver", "hypergrad", "--out", str(out), *CPU_TINY],
                       cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    line = (out / "command.txt").read_text().strip()
    assert line == shlex.join(["python", "-m", "cpu_ver", "hypergrad", "--out", str(out), *CPU_TINY])
    assert json.loads((out / "results.json").read_text())["command"] == shlex.split(line)


def test_gpu_command_record_can_be_pasted():
    args = gpu_main.build_parser().parse_args(["check", "--tol", "1e-5"])
    args._argv = ["check", "--tol", "1e-5"]
    assert gpu_main.argv_record(args) == ["python", "-m", "gpu_ver", "check", "--tol", "1e-5"]


def test_run_files_and_replace_on_first_use(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    for name in ("results.json", "checkpoint-baseline.npz", "notes.txt", "curves.png"):
        (d / name).write_text("x")
    assert records.run_files(d) == ["checkpoint-baseline.npz", "curves.png", "results.json"]
    records.replace_on_first_use(d)
    records.make_run_dir(d)
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]       # not a run file: kept
    (d / "results.json").write_text("new")
    records.make_run_dir(d)                                           # only the first call clears
    assert (d / "results.json").read_text() == "new"


# --------------------------------------------------------------------------- output (item 10)
def test_closed_stdout_ends_quietly(tmp_path):
    """``python -m cpu_ver check | head -1``: no BrokenPipeError traceback."""
    p = subprocess.Popen([sys.executable, "-m", "cpu_ver", "check", "--iters", "5", "--no-progress",
                          "--out", str(tmp_path / "c")], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()                       # the reader is gone before the table is printed
    err = p.stderr.read().decode()
    p.wait(timeout=600)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert p.returncode == cli.EXIT_BROKEN_PIPE


# --------------------------------------------------------------------------- final figures (item 4)
def test_meta_final_figures_describe_the_saved_hyperparameters(tmp_path, capsys):
    from cpu_ver import meta
    from shared.hyperparams import HyperParams

    out = tmp_path / "m"
    assert cpu_main.main(["meta", "--out", str(out), "--meta-iters", "1", *CPU_TINY]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("validation loss"))
    m = json.loads((out / "results.json").read_text())["metrics"]
    problem, hypers, _ = cpu_main.build(cpu_main.parser().parse_args(["meta", *CPU_TINY]))
    saved = HyperParams.load(out / "hypers", hypers.layout)
    want = meta.evaluate_hypers(problem, saved)
    assert m["final_val_loss"] == want["val_loss"] and m["final_test_error"] == want["test_error"]
    assert m["final_val_loss"] != m["val_loss"][-1]          # the update after the last hypergradient counts
    assert line.split(" over ")[0].endswith(f"-> {want['val_loss']:.4f}"), line


# --------------------------------------------------------------------------- divergence (item 8)
def test_diverged_adaptive_run_stops_naming_the_step(tmp_path, capsys):
    out = tmp_path / "a"
    _refused(cpu_main.main, ["adaptive", "--lr", "1e30", "--steps", "10", "--n-train", "200", "--n-val", "100",
                             "--no-progress", "--no-baseline", "--out", str(out)], capsys,
             "training loss", "at step 10")
    assert not (out / "results.json").exists()


def test_check_loss_bounds():
    from shared.errors import LOSS_BOUND, DivergedError, NonFiniteError, check_loss

    check_loss("loss", 2.3, 1)
    with pytest.raises(DivergedError, match="loss diverged at step 4"):
        check_loss("loss", 2 * LOSS_BOUND, 4)
    with pytest.raises(NonFiniteError, match="non-finite loss at step 5"):
        check_loss("loss", float("nan"), 5)


# --------------------------------------------------------------------------- API level (item 11)
def test_meta_resume_from_a_checkpoint_without_history_is_a_named_error(tmp_path, capsys):
    out = tmp_path / "m"
    assert cpu_main.main(["meta", "--out", str(out), "--meta-iters", "1", *CPU_TINY]) == 0
    arrays, meta = records.load_checkpoint(out / "checkpoint.npz")
    del arrays["hist_val_loss"]
    records.save_checkpoint(out / "checkpoint.npz", arrays, meta)
    capsys.readouterr()
    _refused(cpu_main.main, ["meta", "--resume", str(out), "--meta-iters", "2", *CPU_TINY], capsys,
             "checkpoint.npz", "hist_val_loss")


def test_hypers_for_another_layout_or_step_count_are_refused():
    """cpu_ver refuses them as gpu_ver does (shared.hyperparams.check_fits), before training."""
    from cpu_ver import drmad, reversible, sgd

    args = cpu_main.parser().parse_args(["hypergrad", *CPU_TINY])
    problem, hypers, _ = cpu_main.build(args)
    _, other_T, _ = cpu_main.build(cpu_main.parser().parse_args(["hypergrad", *CPU_TINY, "--iters", "12"]))
    _, other_layout, _ = cpu_main.build(cpu_main.parser().parse_args(["hypergrad", *CPU_TINY,
                                                                       "--layers", "64,13,10"]))
    for run in (sgd.train, reversible.hypergradient, drmad.hypergradient):
        with pytest.raises(ConfigError, match="12 training steps; this run has 8"):
            run(problem, other_T)
        with pytest.raises(ConfigError, match="another layout"):
            run(problem, other_layout)


def test_resumed_meta_timings_count_the_whole_run(tmp_path):
    out = tmp_path / "m"
    assert cpu_main.main(["meta", "--out", str(out), "--meta-iters", "1", *CPU_TINY]) == 0
    first = json.loads((out / "results.json").read_text())
    assert cpu_main.main(["meta", "--resume", str(out), "--meta-iters", "2", *CPU_TINY]) == 0
    r = json.loads((out / "results.json").read_text())
    seconds = r["metrics"]["seconds"]
    assert len(seconds) == 2 and seconds[0] == first["metrics"]["seconds"][0]
    assert r["timings"]["meta_s"] == pytest.approx(sum(seconds))


def test_resumed_adaptive_timings_count_the_whole_run(tmp_path):
    out = tmp_path / "a"
    argv = ["adaptive", "--steps", "10", "--n-train", "200", "--n-val", "100", "--no-progress", "--no-baseline"]
    assert cpu_main.main([*argv, "--out", str(out), "--stop-after", "5"]) == 0
    _, meta = records.load_checkpoint(out / "checkpoint-adaptive.npz")
    assert cpu_main.main([*argv, "--resume", str(out)]) == 0
    t = json.loads((out / "results.json").read_text())["timings"]
    assert t["train_s"] > meta["spent_s"] > 0
    assert t["train_s"] - meta["spent_s"] <= t["this_process_train_s"] + 1e-6
