"""docs/configuration.md is generated from Settings and must stay in sync with it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from services.common.settings import Settings

ROOT = Path(__file__).resolve().parents[3]


def _gen():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_config_docs", module)
    spec.loader.exec_module(module)
    return module


def test_configuration_doc_is_up_to_date():
    gen = _gen()
    current = (ROOT / "docs" / "configuration.md").read_text()
    assert current == gen.render(), (
        "docs/configuration.md is out of date with services.common.settings.Settings: "
        "run .venv/bin/python scripts/gen_config_docs.py"
    )


def test_every_setting_has_a_description():
    gen = _gen()
    lacking = [
        name for name in gen.missing_descriptions() if not gen.FALLBACK_DESCRIPTIONS.get(name, "").strip()
    ]
    assert not lacking, f"Settings fields without a description (add one in settings.py): {lacking}"


def test_fallback_table_names_only_real_fields():
    gen = _gen()
    stale = sorted(set(gen.FALLBACK_DESCRIPTIONS) - set(Settings.model_fields))
    assert not stale, f"FALLBACK_DESCRIPTIONS names fields Settings no longer has: {stale}"


def test_every_env_var_is_documented():
    text = (ROOT / "docs" / "configuration.md").read_text()
    for name in Settings.model_fields:
        assert f"`MODALMESH_{name.upper()}`" in text
