"""Shared by tests/unit/parity/test_<seed>_prompt.py: the seeds' prompt fixtures against ours.

Each fixture (written by scripts/parity/<seed>_prompt.py from the seed's own prompt code)
holds the ids the seed built for a two-turn conversation with media, media positions as
-(sum of 2**item) of the items summed there. `served_ids` builds the same conversation the
way the engine serves it (`prompt.request_prompt`: the preset's template, media combining,
BOS rule, time parts) with the fixture's tokenizer files loaded as serving loads them
(`services.models.lm.tokenizer.load_tokenizer`, the preset's `dummy_prefix`), and writes the same
markers over each media span.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.common.content import MediaFeatures, MediaPart, media_parts
from services.common.presets import Preset, load_preset
from services.models.lm.tokenizer import load_tokenizer
from services.models.lm.tokens import add_to_tokenizer
from services.models.prompt.builder import (
    ModalitySlots,
    Prompt,
    PromptBuilder,
    placeholder_token_id,
    request_prompt,
)
from services.models.prompt.templates import get_template

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "parity"


def fixture(seed: str) -> dict[str, Any]:
    """tests/fixtures/parity/<seed>/prompt.json."""
    return json.loads((FIXTURES / seed / "prompt.json").read_text())


def real_preset(name: str, tmp_path: Path) -> Preset:
    """A shipped real preset (paths under `tmp_path`; nothing is read from them)."""
    return load_preset(name, cache_dir=tmp_path)


def tokenizer_for(
    preset: Preset, folder: Path, tmp_path: Path, *, add: Sequence[str] = (), special: bool = False
) -> Any:
    """The tokenizer serving loads for `preset` from the fixture folder `folder`; with `add`,
    from the folder `modalmesh add-tokens` writes after adding those tokens to it."""
    if add:
        tokenizer = load_tokenizer(folder)
        add_to_tokenizer(tokenizer, list(add), special=special)
        folder = tmp_path / f"{folder.name}-added"
        tokenizer.save_pretrained(folder)
    return load_tokenizer(folder, dummy_prefix=preset.llm.dummy_prefix)


def item(modality: str, frames: int = 1, times: Sequence[float] = ()) -> MediaPart[MediaFeatures[np.ndarray]]:
    """A media part holding an item of `frames` frames (one feature row each: only the count,
    the modality and the times matter to the prompt)."""
    features = np.zeros((frames, 1), np.float32)  # (frames, 1)
    return MediaPart(MediaFeatures(modality, features, tuple(float(t) for t in times)))


def served_prompt(
    preset: Preset, tokenizer: Any, turns: Sequence[Any], num_tokens: Callable[[str, int], int]
) -> Prompt:
    """The prompt the engine builds for `turns`, whose media parts hold `item`s."""
    spec = preset.heads.timestamps
    slots = {
        m: ModalitySlots(
            s.placeholder,
            placeholder_token_id(tokenizer, s.placeholder),
            s.max_per_prompt,
            lambda frames, m=m: num_tokens(m, frames),
        )
        for m, s in preset.modalities.items()
    }
    time_id = None
    if spec is not None:
        time_id = tokenizer(spec.token, add_special_tokens=False)["input_ids"][0]
    builder = PromptBuilder(
        tokenizer, slots, max_context_tokens=preset.llm.max_context_tokens, time_token_id=time_id
    )
    template = get_template(preset.llm.inference_template or preset.llm.template)
    frames = [int(p.media.features.shape[0]) for p in media_parts(turns)]
    return request_prompt(preset, template, builder, turns, frames)


def marked(prompt: Prompt) -> list[int]:
    """The prompt's ids with each media span's positions set to -(sum of 2**item) of its items."""
    ids = list(prompt.input_ids)
    codes: dict[tuple[int, int], int] = {}
    for item, span in enumerate(prompt.media_spans):
        codes[span] = codes.get(span, 0) - 2**item
    for (start, length), code in codes.items():
        ids[start : start + length] = [code] * length
    return ids


def pieces(tokenizer: Any, ids: Sequence[int]) -> str:
    """Ids as token strings, media markers as [M<code>], for assertion messages."""
    return "".join(f"[M{-i}]" if i < 0 else tokenizer.convert_ids_to_tokens(i) for i in ids)
