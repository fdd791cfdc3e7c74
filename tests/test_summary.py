"""``summarize RUN_DIR...`` in both backends (``shared/summary.py``): one table of the
options that differ and the final figures; summary.csv only with --out."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

import cpu_ver.__main__ as cpu_main
import gpu_ver.__main__ as gpu_main
from shared import records, summary

REPO = Path(__file__).resolve().parents[1]


def _run(folder, command, config, metrics):
    return records.write_results(folder, ["python", "-m", "cpu_ver", command], config, metrics, {}, packages=())


@pytest.fixture
def two_runs(tmp_path):
    base = {"seed": 0, "iters": 8, "out": "x", "data": {"name": "digits", "n_train": 200}}
    a = tmp_path / "exact"
    b = tmp_path / "drmad"
    _run(a, "meta", {**base, "method": "exact", "out": str(a)},
         {"final_val_loss": 0.25, "final_test_error": 0.1, "val_loss": [1.0, 0.5], "learned": {"g": {"x": 1}},
          "hypergradient_norm": {"l2": 3.0}})
    _run(b, "meta", {**base, "method": "drmad", "out": str(b), "data": {"name": "digits", "n_train": 300}},
         {"final_val_loss": 0.5, "final_test_error": 0.2, "val_loss": [1.0, 0.7], "extra": 7})
    return a, b


def test_columns_are_the_differing_options_then_the_scalar_final_figures(two_runs):
    columns, rows = summary.table(two_runs)
    assert columns == ["run", "data.n_train", "method", "final_val_loss", "final_test_error",
                       "hypergradient_norm.l2", "extra"]
    assert rows == [["exact", 200, "exact", 0.25, 0.1, 3.0, None], ["drmad", 300, "drmad", 0.5, 0.2, None, 7]]


@pytest.mark.parametrize("main", [cpu_main.main, gpu_main.main], ids=["cpu_ver", "gpu_ver"])
def test_summarize_prints_only_without_out_and_writes_csv_with_it(main, two_runs, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["summarize", *map(str, two_runs)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["run", "data.n_train", "method", "final_val_loss", "final_test_error",
                              "hypergradient_norm.l2", "extra"]
    assert out[2].split() == ["exact", "200", "exact", "0.25", "0.1", "3"]
    assert not (tmp_path / "runs").exists()                 # no run folder without --out
    dest = tmp_path / "cmp"
    assert main(["summarize", *map(str, two_runs), "--out", str(dest)]) == 0
    with open(dest / "summary.csv") as f:
        table = list(csv.reader(f))
    assert table[0][:3] == ["run", "data.n_train", "method"]
    assert table[2] == ["drmad", "300", "drmad", "0.5", "0.2", "", "7"]
    assert "summarize" in (dest / "command.txt").read_text()
    assert main(["summarize", *map(str, two_runs), "--out", str(dest)]) == 2      # not over an earlier one


@pytest.mark.parametrize("main", [cpu_main.main, gpu_main.main], ids=["cpu_ver", "gpu_ver"])
def test_a_folder_without_results_is_named(main, two_runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    dest = tmp_path / "cmp"
    assert main(["summarize", str(two_runs[0]), str(empty), "--out", str(dest)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {empty}: no results.json (not a run folder)"
    assert not dest.exists()


def test_out_that_is_one_of_the_runs_is_refused(two_runs, capsys):
    assert cpu_main.main(["summarize", *map(str, two_runs), "--out", str(two_runs[0]), "--overwrite"]) == 2
    assert "one of the runs" in capsys.readouterr().err
    assert (two_runs[0] / "results.json").is_file()


def test_gpu_summarize_does_not_import_theano(two_runs):
    code = ("import sys; from gpu_ver.__main__ import main; rc = main(['summarize', *sys.argv[1:]]); "
            "assert 'theano' not in sys.modules, 'theano imported'; sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, *map(str, two_runs)], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert "final_val_loss" in p.stdout
