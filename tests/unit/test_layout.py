"""The import rules of docs/architecture.md ("Layout"), checked by reading every import of the
source tree (absolute, relative, top-level and inside functions).

Project packages are the top-level folders with Python code (gateway, services, modalmesh,
bench, scripts, tests, presets). For a module under `services/` or `gateway/`, every import of a
project package must match one of its layer's allowed prefixes:

- `services/common`: itself only. It is the bottom layer: no model library, no service.
- `services/models` (the model library): `services.common` and itself; no service.
- a service (`services/encoders`, `llm`, `decoders`, `trainer`): `services.common`,
  `services.models` and itself; never another service.
- `gateway/`: itself, `services.common`, the encoder, LLM and decoder services' `client`,
  `protocol` and `params` modules and the trainer's `jobs` and `client` (the job schema);
  nothing else of theirs, and not the model library (the gateway image has no torch).
- all of them may import the generated protobuf modules `modalmesh.v1`; nothing else of
  `modalmesh`, which is the CLI (`modalmesh.cli`, `stack`, `demo*`, `*_cli`, `__main__`), and
  nothing of bench/, scripts/, tests/ or presets/.

Stricter than ../shared/tools/import_rules.py: it resolves relative imports, holds
services/common and services/models to their layers too, and forbids all of `modalmesh` but
`modalmesh.v1` rather than a list of CLI module names.

Within the rules, the modules under `services/` and `gateway/` import one way: no import cycles,
counting the imports inside functions too (a lazy import still makes two modules depend on each
other; it only hides the circle from Python's loader). A module depends on what it names: for
`import a.b` the module a.b, for `from a import b` the module a and, when b is a module, a.b; a
class, a function or a third-party package adds nothing. Importing a submodule also runs its
packages' `__init__`s, which is not counted: a package's `__init__` may name its submodules.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ("gateway", "services", "modalmesh", "bench", "scripts", "tests", "presets")
SERVICES = ("encoders", "llm", "decoders", "trainer")
PROTOBUF = "modalmesh.v1"
GATEWAY_MAY = (
    "gateway",
    "services.common",
    *(f"services.{s}.{m}" for s in ("encoders", "llm", "decoders") for m in ("client", "protocol", "params")),
    "services.trainer.jobs",
    "services.trainer.client",
)


@dataclass(frozen=True)
class Import:
    path: Path  # relative to the tree's root
    line: int
    module: str  # absolute dotted name
    origin: str | None = None  # the `from` module of a from-import (`a` in `from a import b`)


def layer(path: Path) -> str | None:
    """The layer a source file belongs to ("gateway", "services.common", ...), or None."""
    parts = path.parts
    if parts[0] == "gateway":
        return "gateway"
    if parts[0] == "services" and len(parts) > 2:
        return f"services.{parts[1]}"
    if parts[0] == "services":
        return "services"  # services/__init__.py
    return None


def allowed(home: str) -> tuple[str, ...]:
    """The project-package prefixes a layer may import (besides `modalmesh.v1`)."""
    if home == "gateway":
        return GATEWAY_MAY
    if home in ("services", "services.common"):
        return ("services.common",)
    if home == "services.models":
        return ("services.common", "services.models")
    return ("services.common", "services.models", home)  # a service, or a new folder under services/


def module_name(path: Path) -> str:
    parts = path.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path, path: Path) -> list[Import]:
    """Every import of one file, relative ones resolved against its package."""
    rel = path.relative_to(root)
    package = module_name(rel).split(".") if rel.name == "__init__.py" else module_name(rel).split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(rel, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            # each imported name may be a module (`from services import llm`), so it is checked
            # as `target.name`: a prefix rule allows or refuses both readings alike
            found += [
                Import(rel, node.lineno, target if alias.name == "*" else f"{target}.{alias.name}", target)
                for alias in node.names
            ]
    return found


def matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(root: Path) -> list[str]:
    """Every import under services/ and gateway/ that breaks the layout rules."""
    out = []
    for top in ("services", "gateway"):
        for path in sorted((root / top).rglob("*.py")):
            home = layer(path.relative_to(root))
            if home is None:
                continue
            may = allowed(home)
            for imp in imports(root, path):
                if imp.module.split(".")[0] not in PROJECT or matches(imp.module, PROTOBUF):
                    continue
                # `import services` alone loads nothing of a layer
                if imp.module in ("services", "gateway") or any(matches(imp.module, p) for p in may):
                    continue
                out.append(f"{imp.path}:{imp.line}: {home} imports {imp.module}")
    return out


def dependencies(root: Path) -> dict[str, dict[str, Import]]:
    """Module -> {module it imports: the first such import}, over services/ and gateway/."""
    paths = {
        module_name(p.relative_to(root)): p
        for top in ("services", "gateway")
        for p in sorted((root / top).rglob("*.py"))
    }
    graph: dict[str, dict[str, Import]] = {}
    for name, path in paths.items():
        graph[name] = {}
        for imp in imports(root, path):
            for dep in (imp.origin, imp.module):
                if dep in paths and dep != name:
                    graph[name].setdefault(dep, imp)
    return graph


def cycles(root: Path) -> list[tuple[str, ...]]:
    """The import cycles under services/ and gateway/: each set of modules that all reach one
    another through imports (a strongly connected component of two or more), sorted."""
    graph = dependencies(root)

    def reach(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for dep in graph[todo.pop()]:
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    reached = {name: reach(name) for name in graph}
    found = {tuple(sorted({name} | {d for d in reached[name] if name in reached[d]})) for name in graph}
    return sorted(c for c in found if len(c) > 1)


def describe(root: Path, cycle: tuple[str, ...]) -> str:
    """A cycle as the imports that close it, `path:line: module -> module` each."""
    graph = dependencies(root)
    edges = [
        f"  {imp.path}:{imp.line}: {name} -> {dep}"
        for name in cycle
        for dep, imp in sorted(graph[name].items())
        if dep in cycle
    ]
    return " <-> ".join(cycle) + "\n" + "\n".join(edges)


def test_the_tree_follows_the_import_rules() -> None:
    found = violations(ROOT)
    assert not found, "imports that break docs/architecture.md's layout rules:\n" + "\n".join(found)


def test_the_tree_has_no_import_cycles() -> None:
    found = cycles(ROOT)
    assert not found, (
        "modules under services/ and gateway/ that import each other (move what they share "
        "into a leaf module):\n" + "\n".join(describe(ROOT, c) for c in found)
    )


# -- the check itself, on synthetic trees ----------------------------------------------------------
def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


CLEAN = {
    "services/__init__.py": "",
    "services/common/__init__.py": "",
    "services/common/errors.py": "import os\nfrom modalmesh.v1 import llm_pb2\n",
    "services/models/__init__.py": "",
    "services/models/lm.py": "from services.common.errors import E\nfrom . import tiny\n",
    "services/models/tiny.py": "from .lm import LM\n",
    "services/llm/__init__.py": "",
    "services/llm/engine.py": "import torch\nfrom services.models.lm import LM\nfrom .sampling import s\n",
    "services/llm/sampling.py": "from services.common import errors\n",
    "services/llm/client.py": "import grpc\n",
    "services/trainer/__init__.py": "",
    "services/trainer/jobs.py": "from services.common.errors import E\n",
    "services/trainer/loop.py": "def f():\n    from services.models.lm import LM\n",
    "gateway/__init__.py": "",
    "gateway/serving.py": (
        "from services.llm.client import C\nfrom services.trainer.jobs import J\nfrom . import domain\n"
        "from modalmesh.v1 import chat_pb2\nimport services.common.errors\n"
    ),
    "gateway/domain.py": "from gateway.serving import S\n",
}


def test_a_clean_synthetic_tree_passes(tmp_path: Path) -> None:
    assert violations(write(tmp_path, CLEAN)) == []


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        # a service importing another service, absolute, relative or inside a function
        (
            "services/llm/engine.py",
            "from services.trainer.loop import fit\n",
            "services.llm imports services.trainer.loop",
        ),
        (
            "services/llm/engine.py",
            "from ..trainer import loop\n",
            "services.llm imports services.trainer.loop",
        ),
        (
            "services/llm/engine.py",
            "def f():\n    import services.trainer.jobs\n",
            "imports services.trainer.jobs",
        ),
        ("services/trainer/loop.py", "from services import llm\n", "services.trainer imports services.llm"),
        # the model library and services/common import no service; common not the library
        (
            "services/models/lm.py",
            "from services.llm.engine import E\n",
            "services.models imports services.llm",
        ),
        (
            "services/common/errors.py",
            "from services.trainer import jobs\n",
            "services.common imports services",
        ),
        (
            "services/common/errors.py",
            "from services.models.tiny import g\n",
            "services.common imports services.models",
        ),
        # the gateway: client/protocol/params and the trainer's jobs/client only
        ("gateway/serving.py", "from services.llm.engine import E\n", "gateway imports services.llm.engine"),
        (
            "gateway/serving.py",
            "from services.trainer.loop import f\n",
            "gateway imports services.trainer.loop",
        ),
        ("gateway/serving.py", "from services.models.lm import LM\n", "gateway imports services.models.lm"),
        # the CLI package, and the other top-level folders
        ("services/llm/engine.py", "from modalmesh.stack import http_ok\n", "imports modalmesh.stack"),
        ("services/common/errors.py", "import modalmesh.tiny\n", "imports modalmesh.tiny"),
        ("gateway/domain.py", "from modalmesh import cli\n", "gateway imports modalmesh.cli"),
        ("gateway/domain.py", "from tests.helpers import x\n", "gateway imports tests.helpers"),
        ("services/models/tiny.py", "import bench.chat\n", "services.models imports bench.chat"),
    ],
)
def test_each_kind_of_violation_is_found(tmp_path: Path, name: str, text: str, expected: str) -> None:
    tree = write(tmp_path, CLEAN | {name: CLEAN[name] + text})
    found = violations(tree)
    assert len(found) == 1 and expected in found[0], found
    assert found[0].startswith(f"{name}:")


# -- the cycle check, on synthetic trees -----------------------------------------------------------
ONE_WAY = {
    "services/__init__.py": "",
    "services/common/__init__.py": "",
    "services/common/errors.py": "import os\n",
    "services/models/__init__.py": "",
    "services/models/lm.py": "import torch\nfrom services.common.errors import E\nfrom . import parts\n",
    "services/models/parts.py": "from services.common import errors\n",
    "services/models/tiny.py": "def f():\n    from .lm import LM\n    from services.models import parts\n",
    "gateway/__init__.py": "",
    "gateway/serving.py": "from gateway.domain import D\nimport services.common.errors\n",
    "gateway/domain.py": "from services.common.errors import E\n",
}


def test_a_one_way_synthetic_tree_has_no_cycles(tmp_path: Path) -> None:
    tree = write(tmp_path, ONE_WAY)
    assert cycles(tree) == []
    graph = dependencies(tree)
    assert set(graph["services.models.tiny"]) == {
        "services.models",
        "services.models.lm",
        "services.models.parts",
    }
    assert set(graph["gateway.serving"]) == {"gateway.domain", "services.common.errors"}


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        # two modules, by every form of import: absolute, inside a function, relative, `import a.b`
        (
            "services/models/parts.py",
            "from services.models.lm import LM\n",
            ("services.models.lm", "services.models.parts"),
        ),
        (
            "services/models/parts.py",
            "def f():\n    from services.models.lm import LM\n",
            ("services.models.lm", "services.models.parts"),
        ),
        ("services/models/parts.py", "from . import lm\n", ("services.models.lm", "services.models.parts")),
        (
            "services/models/parts.py",
            "import services.models.lm\n",
            ("services.models.lm", "services.models.parts"),
        ),
        (
            "gateway/domain.py",
            "def f():\n    from .serving import S\n",
            ("gateway.domain", "gateway.serving"),
        ),
        # a longer circle, closed inside a function across two packages
        (
            "services/common/errors.py",
            "def f():\n    from services.models.tiny import g\n",
            ("services.common.errors", "services.models.lm", "services.models.parts", "services.models.tiny"),
        ),
    ],
)
def test_each_kind_of_cycle_is_found(tmp_path: Path, name: str, text: str, expected: tuple[str, ...]) -> None:
    tree = write(tmp_path, ONE_WAY | {name: ONE_WAY[name] + text})
    assert cycles(tree) == [expected]
    shown = describe(tree, expected)
    assert f"{name}:" in shown and " -> " in shown, shown


def test_the_layout_rules_allow_cycles_the_cycle_check_finds(tmp_path: Path) -> None:
    # CLEAN follows every layout rule, and two of its layers import in a circle
    assert cycles(write(tmp_path, CLEAN)) == [
        ("gateway.domain", "gateway.serving"),
        ("services.models.lm", "services.models.tiny"),
    ]
