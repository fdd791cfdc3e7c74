"""The documentation travels with the code: every cited file and equation exists.

(a) Every ``*.md`` path mentioned in a .py, .sh or .md file of the repository (outside
    .venv, .git and build outputs) exists, relative to the repository root or to the
    citing file's folder. A bare ``ALGORITHMS.md`` therefore fails: the docs live in
    ``docs/``. ``PENDING`` lists files another branch is writing.
(b) Every ``docs/ALGORITHMS.md eq. N`` / ``eqs. N-M`` / ``eqs. N, M`` citation names
    equations tagged ``(N)`` at the end of an indented line of docs/ALGORITHMS.md, and every
    ``docs/<FILE>.md s.N`` names a section ``## N.`` of that file.
(c) docs/ALGORITHMS.md numbers its equations 1, 2, ... once each, in order.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", ".git", ".thcache", "gpu_bundle", "runs", "build", "dist", "__pycache__",
             ".pytest_cache", "hypergrad_hpo.egg-info"}
PENDING = set()     # files another branch is still writing (none)

MD_PATH = re.compile(r"(?<![\w/.:-])((?:\.\./|[\w.-]+/)*[\w-]+\.md)\b")
EQ_CITE = re.compile(r"docs/ALGORITHMS\.md,? eqs?\. (\d+(?:\s*(?:-|,|and)\s*\d+)*)")
SECTION_CITE = re.compile(r"docs/(\w+)\.md,? s\.(\d+)")
EQ_TAG = re.compile(r"\((\d+)\)\s*$")


def _files():
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for name in names:
            if name.endswith((".py", ".sh", ".md")):
                yield Path(root) / name


def _numbers(spec: str) -> list:
    out = []
    for part in re.split(r"\s*(?:,|and)\s*", spec):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def _rel(f: Path) -> str:
    return str(f.relative_to(REPO)) if f.is_relative_to(REPO) else f.name


def equation_numbers(text: str) -> list:
    """The tags ``(N)`` that end a line of an indented (code) block."""
    return [int(m.group(1)) for line in text.splitlines()
            if line.startswith("    ") and (m := EQ_TAG.search(line))]


def missing_paths(files) -> list:
    bad = []
    for f in files:
        if f.name == "test_docs.py":
            continue
        for m in MD_PATH.finditer(f.read_text(encoding="utf-8", errors="replace")):
            name = m.group(1)
            if name in PENDING or (REPO / name).exists() or (f.parent / name).exists():
                continue
            bad.append(f"{_rel(f)} cites {name}")
    return sorted(set(bad))


def bad_citations(files) -> list:
    algo = REPO / "docs" / "ALGORITHMS.md"
    eqs = set(equation_numbers(algo.read_text(encoding="utf-8"))) if algo.exists() else set()
    bad = []
    for f in files:
        if f.name == "test_docs.py":
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        for m in EQ_CITE.finditer(text):
            for n in _numbers(m.group(1)):
                if n not in eqs:
                    bad.append(f"{_rel(f)} cites docs/ALGORITHMS.md eq. {n}")
        for m in SECTION_CITE.finditer(text):
            doc = REPO / "docs" / f"{m.group(1)}.md"
            heads = re.findall(r"^## (\d+)\.", doc.read_text(encoding="utf-8"), re.M) if doc.exists() else []
            if m.group(2) not in heads:
                bad.append(f"{_rel(f)} cites docs/{m.group(1)}.md s.{m.group(2)}")
    return sorted(set(bad))


def test_every_cited_md_file_exists():
    assert missing_paths(list(_files())) == []


def test_every_equation_and_section_citation_resolves():
    assert bad_citations(list(_files())) == []


def test_algorithms_numbers_its_equations_once_in_order():
    nums = equation_numbers((REPO / "docs" / "ALGORITHMS.md").read_text(encoding="utf-8"))
    assert nums == list(range(1, len(nums) + 1))


def test_the_checks_can_fail(tmp_path):
    f = tmp_path / "probe.py"
    f.write_text('"""see ALGORITHMS.md s.1 and docs/ALGORITHMS.md eq. 999, docs/DESIGN.md s.99"""\n')
    assert missing_paths([f]) == ["probe.py cites ALGORITHMS.md"]
    assert bad_citations([f]) == ["probe.py cites docs/ALGORITHMS.md eq. 999", "probe.py cites docs/DESIGN.md s.99"]
    assert _numbers("1-3, 5 and 7") == [1, 2, 3, 5, 7]
