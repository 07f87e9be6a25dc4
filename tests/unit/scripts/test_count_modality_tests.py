"""scripts/count_modality_tests.py: what counts as a test of a modality's name."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).parents[3] / "scripts" / "count_modality_tests.py"


def _places(code: str) -> list[str]:
    spec = importlib.util.spec_from_file_location("count_modality_tests", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [what for _, what in module.places(ast.parse(code))]


def test_name_tests_tables_and_lists_count() -> None:
    code = """
if modality == "audio": pass
if decoder.kind in ("image", "video"): pass
x = {"image": 1, "video": 2}
y = {"image_url": "image", "video_url": "video"}
MODALITIES = ("image", "video", "audio")
"""
    assert _places(code) == [
        "modality == 'audio'",
        "decoder.kind in ('image', 'video')",
        "dict keyed by image, video",
        "dict with values image, video",
        "literal ('image', 'video', 'audio')",
    ]


def test_lookups_and_other_kinds_do_not_count() -> None:
    code = """
record = modalities.get(modality)
if kind == "text": pass
if dtype.kind in "iu": pass
if modality in preset.modalities: pass
z = {"image": 1}
"""
    assert _places(code) == []
