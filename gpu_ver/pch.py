"""A precompiled header for the C modules that Theano builds on the CPU backend.

Every module Theano compiles for a C op starts with the same includes
(``theano.link.c.basic.CLinker.headers``: Python.h, iostream,
theano_mod_helper.h, math.h, numpy/arrayobject.h, numpy/arrayscalars.h, in this
order, before any op's own headers or code). gcc parses those ~40k lines again
for every module: measured here, 0.6-0.9 s of a module's 1.2-1.7 s, and a cold
DenseNet compile builds a hundred modules or more.

``install`` parses them once into ``<compiledir>/hpo-pch/<key>/hpo_pch.h.gch``
with the arguments Theano gives every module (``CLinker.compile_args``'s fixed
part plus ``GCC_compiler.compile_args()``) and adds ``-include <that>/hpo_pch.h``
to ``gcc__cxxflags``. gcc loads the .gch when it is valid for a module's command
line and otherwise reads hpo_pch.h as text, so a module sees exactly the
includes it would see anyway, in the same order; the guards make its own
``#include`` lines no-ops. The key hashes the compiler's version, the arguments,
the include folders and the header, so a changed setup gets a new file.
Both files are written under temporary names and renamed (the .gch first), so a
process sharing the compile directory never sees half a header.

Not used on the CUDA device (the gpuarray ops' modules include pygpu's headers
and are untested with it here), with a compiler other than g++, or where the
path has a space (``gcc__cxxflags`` is split on spaces). ``HPO_PCH=0`` turns it
off. Measured: see README (the test suite's cold compile time).
"""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

from shared.records import write_text_atomic

ENV_SWITCH = "HPO_PCH"
HEADERS = ("<Python.h>", "<iostream>", '"theano_mod_helper.h"', "<math.h>",
           "<numpy/arrayobject.h>", "<numpy/arrayscalars.h>")
# CLinker.compile_args's fixed part (Theano-PyMC 1.1.2), which precedes GCC_compiler.compile_args().
FIXED_ARGS = ("-O3", "-fno-math-errno", "-Wno-unused-label", "-Wno-unused-variable", "-Wno-write-strings")
NAME = "hpo_pch.h"

_log = logging.getLogger(__name__)


def header_text() -> str:
    return "".join(f"#include {h}\n" for h in HEADERS)


def _compiler_version(cxx: str) -> str:
    r = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False)
    return r.stdout.splitlines()[0] if r.returncode == 0 and r.stdout else ""


def pch_key(cxx: str, args, include_dirs) -> str:
    h = hashlib.sha256()
    for part in (_compiler_version(cxx), cxx, *args, "--", *include_dirs, "--", header_text()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:20]


def build(root, cxx: str, args, include_dirs):
    """Path of ``hpo_pch.h`` (with its ``.gch`` beside it) under ``root``, built if absent;
    None if gcc fails (the reason is logged; modules then compile without it)."""
    folder = Path(root) / pch_key(cxx, args, include_dirs)
    header, gch = folder / NAME, folder / (NAME + ".gch")
    if header.is_file() and gch.is_file():
        return header
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_gch = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".gch")
    os.close(fd)
    src = folder / f".src-{os.getpid()}-{NAME}"
    src.write_text(header_text())
    cmd = [cxx, "-x", "c++-header", *args, *(f"-I{d}" for d in include_dirs), str(src), "-o", tmp_gch]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            _log.warning("precompiled header not built (modules compile without it): %s",
                         (r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1])
            return None
        os.chmod(tmp_gch, 0o644)
        os.replace(tmp_gch, gch)
        write_text_atomic(header, header_text())
        return header
    finally:
        for p in (src, Path(tmp_gch)):
            if p.exists():
                p.unlink()


def install(theano):
    """Build the header for this process's Theano settings and add it to ``gcc__cxxflags``.
    Returns the header's path, or None where it is not used (see the module docstring)."""
    cfg = theano.config
    if os.environ.get(ENV_SWITCH, "1").strip() in ("0", "false", "no"):
        return None
    if str(cfg.device).startswith(("cuda", "gpu")) or "g++" not in os.path.basename(str(cfg.cxx or "")):
        return None
    flags = str(cfg.gcc__cxxflags)
    if f"{NAME}" in flags:                 # already installed in this process
        return None
    from theano.link.c import cmodule  # noqa: PLC0415 (Theano is loaded by our caller)
    args = list(FIXED_ARGS) + list(cmodule.GCC_compiler.compile_args())
    root = Path(cfg.compiledir) / "hpo-pch"
    if " " in str(root):
        return None
    header = build(root, str(cfg.cxx), args, cmodule.std_include_dirs())
    if header is not None:
        cfg.gcc__cxxflags = f"{flags} -include {header}".strip()
    return header
