"""gpu_ver/pch.py: the precompiled header is built, named in gcc__cxxflags, and gcc
actually uses it for a module compiled with Theano's arguments (``-H`` marks a
loaded .gch with '!'); a failed build leaves modules to compile without it."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from gpu_ver import config

theano = config.load(device="cpu", floatX="float64")

from theano.link.c import cmodule  # noqa: E402

from gpu_ver import pch  # noqa: E402

pytestmark = pytest.mark.skipif(not theano.config.cxx or shutil.which(theano.config.cxx) is None,
                                reason="no C++ compiler")


def _header():
    flags = theano.config.gcc__cxxflags.split()
    assert "-include" in flags, f"gcc__cxxflags has no precompiled header: {flags}"
    return flags[flags.index("-include") + 1]


def test_header_is_installed_and_used_by_gcc(tmp_path):
    header = _header()
    assert header.startswith(str(theano.config.compiledir)) and header.endswith(pch.NAME)
    src = tmp_path / "mod.cpp"
    src.write_text(pch.header_text() + "int f() { return NPY_DOUBLE; }\n")
    args = list(pch.FIXED_ARGS) + list(cmodule.GCC_compiler.compile_args())   # what a module gets
    r = subprocess.run([theano.config.cxx, "-c", "-H", "-Winvalid-pch", *args,
                        *(f"-I{d}" for d in cmodule.std_include_dirs()), str(src), "-o", str(tmp_path / "m.o")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"! {header}.gch" in r.stderr.splitlines(), r.stderr[:2000]
    assert "not used" not in r.stderr


def test_build_is_reused_and_a_failed_build_returns_none(tmp_path):
    args = list(pch.FIXED_ARGS)
    dirs = cmodule.std_include_dirs()
    h = pch.build(tmp_path, theano.config.cxx, args, dirs)
    assert h is not None and h.read_text() == pch.header_text() and (h.parent / (pch.NAME + ".gch")).is_file()
    mtime = (h.parent / (pch.NAME + ".gch")).stat().st_mtime_ns
    assert pch.build(tmp_path, theano.config.cxx, args, dirs) == h
    assert (h.parent / (pch.NAME + ".gch")).stat().st_mtime_ns == mtime      # not rebuilt
    assert pch.build(tmp_path, theano.config.cxx, ["--no-such-gcc-option"], dirs) is None
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [pch.NAME, pch.NAME + ".gch"]


def test_install_once_per_process():
    before = theano.config.gcc__cxxflags
    assert pch.install(theano) is None and theano.config.gcc__cxxflags == before
