"""Count the per-modality tests in code: the places that branch on a modality's name.

Counted (AST, in the .py files under the given folders, default services gateway modalmesh,
generated protobuf modules left out):
- a comparison (==, !=, in, not in) against a string literal or a tuple/list/set of string
  literals, of a name or attribute containing "modality" (any literal) or "kind" (a literal
  holding a modality name), e.g. `modality == "audio"`, `decoder.kind in ("image", "video")`;
- a dict literal whose keys or whose values include at least two modality names (image,
  video, audio, event, thermal, depth, imu), e.g. `{"image": 5.0, "video": 30.0}`,
  `{"image_url": "image", "video_url": "video"}`;
- a tuple, list or set literal (outside such a comparison) of at least two modality names,
  e.g. `MODALITIES = ("image", "video")`, `Literal["image", "audio", "video"]`.

Usage: python scripts/count_modality_tests.py [--list] [folder ...]
Before/after (issue 16): run it on main's commit (`git worktree add /tmp/m <commit>`) and here.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path

NAMES = frozenset({"image", "video", "audio", "event", "thermal", "depth", "imu"})
DEFAULT_ROOTS = ("services", "gateway", "modalmesh")


def _strings(node: ast.expr) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return set()


def _names_modality(node: ast.expr, literal: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        text = node.id
    elif isinstance(node, ast.Attribute):
        text = node.attr
    else:
        return False
    text = text.lower()
    return "modality" in text or ("kind" in text and bool(_strings(literal) & NAMES))


def _is_literal(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return bool(node.elts) and all(
            isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts
        )
    return False


def places(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, what) of each modality test in one module."""
    consumed: set[int] = set()
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for op, left, right in zip(node.ops, operands, operands[1:], strict=False):
                if not isinstance(op, ast.Eq | ast.NotEq | ast.In | ast.NotIn):
                    continue
                if (_names_modality(left, right) and _is_literal(right)) or (
                    _names_modality(right, left)
                    and _is_literal(left)
                    and not isinstance(op, ast.In | ast.NotIn)
                ):
                    consumed.update(id(n) for n in (left, right))
                    found.append((node.lineno, ast.unparse(node)))
                    break
        elif isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
            values = {
                v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)
            }
            if len(keys & NAMES) >= 2:
                found.append((node.lineno, "dict keyed by " + ", ".join(sorted(keys & NAMES))))
            elif len(values & NAMES) >= 2:
                found.append((node.lineno, "dict with values " + ", ".join(sorted(values & NAMES))))
            consumed.update(id(v) for v in node.values)
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple | ast.List | ast.Set) and id(node) not in consumed:
            names = _strings(node) & NAMES
            if len(names) >= 2:
                found.append((node.lineno, "literal " + ast.unparse(node)))
    yield from sorted(found)


def count(roots: list[str]) -> list[tuple[str, int, str]]:
    """Every modality test under `roots`: (path, line, what)."""
    found = []
    for root in roots:
        for path in sorted(Path(root).rglob("*.py")):
            if "v1" in path.parts and path.parts[0] == "modalmesh":
                continue  # generated protobuf modules
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            found += [(str(path), line, what) for line, what in places(tree)]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="*", default=list(DEFAULT_ROOTS))
    parser.add_argument("--list", action="store_true", help="print each place")
    args = parser.parse_args(argv)
    found = count(args.roots)
    if args.list:
        for path, line, what in found:
            sys.stdout.write(f"{path}:{line}: {what}\n")
    sys.stdout.write(f"{len(found)} modality tests\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
