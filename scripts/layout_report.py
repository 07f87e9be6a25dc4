#!/usr/bin/env python
"""The layout figures of a modalmesh tree, for issue closing notes: the 15 largest files and
the 10 largest classes (in lines) under services/, gateway/ and modalmesh/ (not the generated
modalmesh/v1), the imports that break the layout rules, and the duplicated regions outside
tests/.

    .venv/bin/python scripts/layout_report.py [TREE]        (TREE: default ".")

TREE may be any checkout, e.g. an older commit's (`git worktree add /tmp/before <rev>`): the
rules come from this script's own repository (`tests/unit/test_layout.py`, the rules of
docs/architecture.md), so both trees are measured by the same check.

Duplicates: with the `duplicates` command on PATH (the tool library's; six or more shared lines,
the same or the same shape with other names), its pairs over the whole tree are read and those
with a side under tests/ dropped. Without it, a fallback: windows of 6 consecutive normalised
lines (stripped, blank lines, comments and imports dropped) hashed across the non-test .py
files, overlapping windows of one pair of files merged into one region; identical lines only.
The report says which one it used.
"""

from __future__ import annotations

import ast
import hashlib
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))

from tests.unit.test_layout import violations  # noqa: E402  (the rules, from this repository)

SOURCE = ("services", "gateway", "modalmesh")
GENERATED = Path("modalmesh/v1")
WINDOW = 6


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")


def source_files(tree: Path) -> list[Path]:
    files = []
    for top in SOURCE:
        for path in sorted((tree / top).rglob("*.py")):
            rel = path.relative_to(tree)
            if not rel.is_relative_to(GENERATED) and "__pycache__" not in rel.parts:
                files.append(rel)
    return files


def largest_files(tree: Path, files: list[Path], n: int = 15) -> list[tuple[int, str]]:
    sizes = [(len((tree / f).read_text().splitlines()), str(f)) for f in files]
    return sorted(sizes, key=lambda x: (-x[0], x[1]))[:n]


def largest_classes(tree: Path, files: list[Path], n: int = 10) -> list[tuple[int, str]]:
    sizes = []
    for f in files:
        for node in ast.walk(ast.parse((tree / f).read_text(), str(f))):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                sizes.append((node.end_lineno - node.lineno + 1, f"{f}:{node.lineno} {node.name}"))
    return sorted(sizes, key=lambda x: (-x[0], x[1]))[:n]


def rule_breaks(tree: Path) -> list[str]:
    """One line per import statement that breaks a rule (an import of several names is one)."""
    seen: dict[str, str] = {}
    for line in violations(tree):
        where = line.partition(": ")[0]
        seen.setdefault(where, line)
    return list(seen.values())


def in_tests(place: str) -> bool:
    return place.startswith("tests/")


ROW = re.compile(r"^D\d+ (\S+):\d+-\d+ ~ (\S+):\d+-\d+")


def duplicates_tool(tree: Path) -> tuple[str, list[str]] | None:
    """Rows of the `duplicates` command with no side under tests/, or None without it."""
    exe = shutil.which("duplicates")
    if exe is None:
        return None
    done = subprocess.run(
        [exe, "--repo", str(tree), "--most", "200", "--seconds", "120"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = done.stdout.splitlines()
    rows = [ln for ln in lines if (m := ROW.match(ln)) and not (in_tests(m.group(1)) or in_tests(m.group(2)))]
    notes = [ln for ln in lines if ln.startswith(("(+", "left out:", "incomplete:"))]
    method = (
        "the `duplicates` command (6+ lines, identical or same shape), rows with a side in tests/ dropped"
    )
    if notes:
        method += "; its notes: " + " | ".join(notes)
    return method, rows


def normalised(path: Path) -> list[tuple[int, str]]:
    kept = []
    for k, raw in enumerate(path.read_text(errors="replace").splitlines(), 1):
        line = " ".join(raw.split())
        if not line or line.startswith("#") or line.startswith(("import ", "from ")) or len(line) < 4:
            continue
        kept.append((k, line))
    return kept


def duplicates_fallback(tree: Path) -> tuple[str, list[str]]:
    """Regions of 6+ identical normalised lines found in two places outside tests/."""
    listed = subprocess.run(["git", "-C", str(tree), "ls-files", "*.py"], capture_output=True, text=True)
    names = (
        listed.stdout.split()
        if listed.returncode == 0
        else [str(p.relative_to(tree)) for p in tree.rglob("*.py")]
    )
    windows: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
    for name in names:
        if in_tests(name) or name.startswith(f"{GENERATED}/") or not (tree / name).is_file():
            continue
        lines = normalised(tree / name)
        for i in range(len(lines) - WINDOW + 1):
            chunk = "\n".join(text for _, text in lines[i : i + WINDOW])
            windows[hashlib.sha1(chunk.encode()).hexdigest()].append(
                (name, lines[i][0], lines[i + WINDOW - 1][0])
            )
    spans: dict[tuple[str, str], list[tuple[int, int, int, int]]] = defaultdict(list)
    for places in windows.values():
        if len(places) > 8:  # boilerplate that recurs everywhere
            continue
        for a in range(len(places)):
            for b in range(a + 1, len(places)):
                (fa, sa, ea), (fb, sb, eb) = sorted([places[a], places[b]])
                spans[(fa, fb)].append((sa, ea, sb, eb))
    rows = []
    for (fa, fb), found in sorted(spans.items()):
        found.sort()
        region = list(found[0])
        for sa, ea, sb, eb in found[1:]:
            if sa <= region[1] + 1 and (fa != fb or sb > region[1]):
                region[1], region[3] = max(region[1], ea), max(region[3], eb)
            else:
                rows.append(f"{fa}:{region[0]}-{region[1]} ~ {fb}:{region[2]}-{region[3]}")
                region = [sa, ea, sb, eb]
        rows.append(f"{fa}:{region[0]}-{region[1]} ~ {fb}:{region[2]}-{region[3]}")
    return f"fallback: {WINDOW}-line windows of identical normalised lines, outside tests/", rows


def main(argv: list[str]) -> int:
    tree = Path(argv[0] if argv else ".").resolve()
    files = source_files(tree)
    out(f"layout report of {tree} ({len(files)} .py files under {', '.join(SOURCE)}, not {GENERATED})")
    out()
    out("15 largest files (lines):")
    for size, name in largest_files(tree, files):
        out(f"  {size:5d}  {name}")
    out()
    out("10 largest classes (lines):")
    for size, name in largest_classes(tree, files):
        out(f"  {size:5d}  {name}")
    out()
    breaks = rule_breaks(tree)
    kinds = Counter(re.sub(r"^.*?: (\S+) imports (\w+\.?\w*).*$", r"\1 -> \2", b) for b in breaks)
    out(f"imports that break the layout rules (tests/unit/test_layout.py): {len(breaks)} statements")
    for kind, count in sorted(kinds.items(), key=lambda x: (-x[1], x[0])):
        out(f"  {count:4d}  {kind}")
    for line in breaks[:15]:
        out(f"    {line}")
    if len(breaks) > 15:
        out(f"    ... and {len(breaks) - 15} more")
    out()
    found = duplicates_tool(tree) or duplicates_fallback(tree)
    method, rows = found
    out(f"duplicated regions outside tests/: {len(rows)} pairs ({method})")
    for row in rows:
        out(f"  {row}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
