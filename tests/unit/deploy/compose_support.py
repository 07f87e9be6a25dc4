"""Reading the compose files the way `docker compose` does, for the static deployment checks.

- YAML with the Compose-specific tags `!reset` and `!override` (PyYAML's SafeLoader plus two
  constructors); anchors, aliases and `<<` merge keys are plain YAML.
- Interpolation of `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`,
  `${VAR?error}` and `$$`, from a given environment (the tests use .env.example's values).
- Merging an override file onto a base, after the Compose specification's "Merge and override"
  section (compose-spec 13-merge.md), for the keys these files use: mappings merge key by key;
  `command`, `entrypoint` and `healthcheck.test` are replaced; `ports`, `volumes`, `secrets`
  and `configs` entries with the same target (container side) are replaced, others appended;
  other sequences are appended; `!reset` removes the attribute, `!override` replaces it whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[3]
SCHEMA_PATH = Path(__file__).resolve().parent / "data" / "compose-spec.json"
GPU_FILES = (ROOT / "docker-compose.yml",)
CPU_FILES = (ROOT / "docker-compose.yml", ROOT / "docker-compose.cpu.yml")


@dataclass(frozen=True)
class Reset:
    """`!reset <value>`: the attribute is removed (the value is only there to be valid YAML)."""

    value: Any


@dataclass(frozen=True)
class Override:
    """`!override <value>`: the attribute is replaced whole instead of merged."""

    value: Any


class ComposeLoader(yaml.SafeLoader):
    """SafeLoader that knows the Compose tags."""


def _construct(kind: type[Reset] | type[Override]):
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> Reset | Override:
        if isinstance(node, yaml.MappingNode):
            return kind(loader.construct_mapping(node, deep=True))
        if isinstance(node, yaml.SequenceNode):
            return kind(loader.construct_sequence(node, deep=True))
        value = loader.construct_scalar(node)
        return kind(None if value in ("", "null", "~") else value)

    return construct


ComposeLoader.add_constructor("!reset", _construct(Reset))
ComposeLoader.add_constructor("!override", _construct(Override))


def load(path: Path) -> dict[str, Any]:
    """One compose file as YAML data, with Reset/Override markers where the tags stand."""
    data = yaml.load(path.read_text(), Loader=ComposeLoader)  # a SafeLoader subclass
    assert isinstance(data, dict), f"{path}: expected a mapping at the top, got {type(data).__name__}"
    return data


def strip_tags(value: Any) -> Any:
    """The file's data with each tag replaced by its literal value (to validate a file alone)."""
    if isinstance(value, Reset | Override):
        return strip_tags(value.value)
    if isinstance(value, dict):
        return {k: strip_tags(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strip_tags(v) for v in value]
    return value


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def variables(text: str) -> set[str]:
    """Names of the variables `text` interpolates (`$$` is an escaped dollar, not a variable)."""
    return {m.group(1) or m.group(4) for m in _VAR.finditer(text) if m.group(0) != "$$"}


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """`value` with every string interpolated from `env`, as Compose does before merging."""
    if isinstance(value, Reset | Override):
        return type(value)(interpolate(value.value, env))
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        unset_or_empty = not env.get(name)
        if op == ":-":
            return arg if unset_or_empty else env[name]
        if op == "-":
            return env.get(name, arg)
        if op in (":?", "?") and (unset_or_empty if op == ":?" else name not in env):
            raise KeyError(f"${{{name}}} is required: {arg}")
        return env.get(name, "")

    return _VAR.sub(sub, value)


_REPLACED = {"command", "entrypoint", "test"}
_UNIQUE_BY_TARGET = {"ports", "volumes", "secrets", "configs"}


def _target(key: str, entry: Any) -> Any:
    """The unique key of a ports/volumes/secrets/configs entry (short or long syntax)."""
    if isinstance(entry, dict):
        return entry.get("target", entry.get("source"))
    text = str(entry)
    if key == "ports":
        return text.split("/")[0].rsplit(":", 1)[-1]
    if key == "volumes":
        parts = text.split(":")
        return parts[1] if len(parts) > 1 else parts[0]
    return text


def merge(base: Any, override: Any, key: str = "") -> Any:
    """`override` merged onto `base` (see the module docstring for the rules)."""
    if isinstance(override, Override):
        return strip_tags(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            if isinstance(v, Reset):
                out.pop(k, None)
            elif k in out:
                out[k] = merge(out[k], v, k)
            else:
                out[k] = strip_tags(v)
        return out
    if isinstance(base, list) and isinstance(override, list) and key not in _REPLACED:
        if key in _UNIQUE_BY_TARGET:
            kept = {_target(key, e): e for e in base}
            kept.update({_target(key, e): e for e in override})
            return list(kept.values())
        return base + [e for e in override if e not in base]
    return strip_tags(override)


def stack(files: tuple[Path, ...], env: dict[str, str]) -> dict[str, Any]:
    """The effective model of `docker compose -f a -f b ...`: each file interpolated, then merged."""
    model: dict[str, Any] = {}
    for path in files:
        model = merge(model, interpolate(load(path), env))
    return model


def env_example() -> dict[str, str]:
    """The variables .env.example sets (KEY=VALUE lines; comments and blank lines skipped)."""
    values = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example: expected KEY=VALUE, got {line!r}"
            values[name.strip()] = value.strip()
    return values


def profiles_enabled(model: dict[str, Any], profiles: set[str]) -> dict[str, Any]:
    """The services that `--profile` for each of `profiles` would start."""
    return {
        name: svc
        for name, svc in model["services"].items()
        if not svc.get("profiles") or set(svc["profiles"]) & profiles
    }
