"""A synthetic multimodal dataset small enough to train the tiny preset on a CPU, and its scorer.

Each image holds one coloured shape (circle, square or triangle) on a plain background, drawn
with PIL. From fixed seeds `synthesize` writes, under an output folder:

- `images/`: the PNGs (train and held-out images come from different seeds);
- `captions.json`: caption pairs for stage 1 ("a red circle on a white background");
- `train.json`: LLaVA conversations for instruction tuning, one or two questions each;
- `heldout.json`: LLaVA conversations on new images, each with a machine-readable
  `"answer": {"color", "shape"}` and `"kind"`, which `score_reply` checks replies against;
- `meta.json`: counts, seed, colours, shapes and backgrounds, and what was written per modality.

With `modalities` naming "video", "audio" or "event" as well, each of those also gets (see
`_synth_media` for the generators):

- `<modality>/`: its files (mp4 clips of a shape moving left or right, wav tones that are low,
  medium or high, EventGPT .npy streams of an edge moving left or right);
- `captions_<modality>.json`: caption pairs `{"media", "caption"}` ("a red circle moving left",
  "a high tone", "an edge moving right");
- `train_<modality>.json`: LLaVA conversations, one question each;
- `heldout_<modality>.json`: LLaVA conversations on new files with `"kind"` and `"answer"`,
  which `score_reply_for` checks replies against.

With "timestamps" among `modalities`, an E.T. Instruct-style set for the timestamp heads
(format `etinstruct`, modality video):

- `timestamps/`: 8 s videos at 2 fps in which one coloured shape appears at a known whole
  second and is gone from a later one;
- `etinstruct.json`: {"id", "video", "duration", "src", "tgt", "conversations"} asking when the
  shape appears ("At <vid> seconds.", tgt [start]), when it is visible ("From <vid> to <vid>
  seconds.", tgt [start, end]) or what is shown at a time ("... at <vid> seconds?", src [t]);
- `heldout_etinstruct.json`: the same on new videos, with "kind" and "answer" {"color",
  "shape", "start", "end"};
- `captions_timestamps.json`: caption pairs {"video", "caption"} of the same training videos.

With "t2x" among `modalities` and an `output_preset` with outputs (NExT-GPT), text-to-X
captions per output modality and their caption embeddings from the preset's decoders (see
`_synth_outputs`): `t2x.jsonl` and `t2x_heldout.jsonl` (format t2x, stage 2) and `t2x/`.

The words, `Scene` and `draw` live in the leaf `_synth_scene` (re-exported here); this module
imports `_synth_media` and `_synth_outputs` only when their modalities are asked for, and
neither imports it back.

Words come from the tiny preset's tokenizer word list where possible, so sequences stay short.
Two runs with the same arguments write the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.answer_words import SHAPES_KINDS, names_only, reply_words, shapes_correct
from services.common.errors import InvalidArgumentError
from services.common.presets import Preset
from services.trainer._synth_scene import (
    BACKGROUNDS,
    COLORS,
    DIRECTIONS,
    HELDOUT_SEED_OFFSET,
    PITCHES,
    SHAPES,
    TIMED_SECONDS,
    Scene,
    draw,
)

KINDS = SHAPES_KINDS
QUESTIONS: dict[str, tuple[str, ...]] = {
    "color": ("What color is the shape?", "What is the color of the shape?"),
    "shape": ("What shape is in the image?", "What shape is this?"),
    "describe": ("Describe the image.", "Tell me about the image."),
}
MODALITIES = ("image", "video", "audio", "event")
TIMESTAMPS = "timestamps"  # the E.T. Instruct-style set, asked for among `modalities`
T2X = "t2x"  # text-to-X captions + caption embeddings (output side), asked for among `modalities`
TIME_TOKEN = "<vid>"
TIMED_KINDS = ("appear", "span", "at")
VOCABULARY: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "direction": DIRECTIONS,
    "pitch": tuple(PITCHES),
}
# Per media modality: question kind -> (answer fields it checks, questions, reference answer).
MEDIA_KINDS: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...], str]]] = {
    "video": {
        "color": (("color",), ("What color is the shape?",), "The shape is {color}."),
        "shape": (("shape",), ("What shape is in the video?",), "It is a {shape}."),
        "direction": (("direction",), ("Which way is the shape moving?",), "It is moving {direction}."),
        "describe": (("color", "shape", "direction"), ("Describe the video.",), "{Words}."),
    },
    "audio": {
        "pitch": (("pitch",), ("What pitch is the tone?", "How high is the tone?"), "It is {words}."),
    },
    "event": {
        "direction": (("direction",), ("Which way is the edge moving?",), "The edge is moving {direction}."),
    },
}
SIZE_RANGE = (0.6, 0.9)  # shape side as a share of the image side


@dataclass(frozen=True)
class SynthReport:
    """What `synthesize` wrote.

    Attributes:
        out_dir: The output folder.
        captions: Caption pairs (format "captions").
        train: Training conversations (format "llava").
        heldout: Held-out conversations with answers (format "llava").
        meta: Counts and settings.
        train_images: Images behind `captions` and `train`.
        heldout_images: Images behind `heldout`.
        train_samples: Conversations in `train`.
        media: The other modalities written, by name.
    """

    out_dir: Path
    captions: Path
    train: Path
    heldout: Path
    meta: Path
    train_images: int
    heldout_images: int
    train_samples: int
    media: dict[str, MediaReport] = field(default_factory=dict)


@dataclass(frozen=True)
class MediaReport:
    """What `synthesize` wrote for one modality other than "image" (paths as in `SynthReport`)."""

    captions: Path
    train: Path
    heldout: Path
    train_items: int
    heldout_items: int


def _scene(rng: random.Random, image_size: int) -> Scene:
    color, shape, background = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))
    side = rng.randint(round(SIZE_RANGE[0] * image_size), round(SIZE_RANGE[1] * image_size))
    # Roughly centred: the tiny encoder sees 32 px in 8 px patches, and a shape pushed into a
    # corner keeps too few patches to tell a circle from a square.
    slack = image_size - side
    left, top = (
        slack // 2 + rng.randint(-slack // 4, slack // 4),
        slack // 2 + rng.randint(-slack // 4, slack // 4),
    )
    return Scene(color, shape, background, (left, top, side))


def describe(scene: Scene) -> str:
    """The words "red circle on a white background" for a scene."""
    return f"{scene.color} {scene.shape} on a {scene.background} background"


def reference_answer(kind: str, scene: Scene) -> str:
    """The reference answer to a question of `kind` about a scene."""
    if kind == "color":
        return f"The shape is {scene.color}."
    if kind == "shape":
        return f"It is a {scene.shape}."
    return f"A {describe(scene)}."


def _caption(rng: random.Random, scene: Scene) -> str:
    return rng.choice(("a {}", "a picture of a {}")).format(describe(scene))


def _conversation(rng: random.Random, scene: Scene, kinds: list[str]) -> list[dict[str, str]]:
    turns: list[dict[str, str]] = []
    for i, kind in enumerate(kinds):
        question = rng.choice(QUESTIONS[kind])
        turns.append({"from": "human", "value": f"<image>\n{question}" if i == 0 else question})
        turns.append({"from": "gpt", "value": reference_answer(kind, scene)})
    return turns


def _write_images(out_dir: Path, prefix: str, scenes: list[Scene], image_size: int) -> list[str]:
    paths = []
    for i, scene in enumerate(scenes):
        rel = f"images/{prefix}_{i:05d}.png"
        draw(scene, image_size).save(out_dir / rel, format="PNG")
        paths.append(rel)
    return paths


def _dump(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")


def synthesize(
    out_dir: Path,
    *,
    train: int = 600,
    heldout: int = 60,
    seed: int = 0,
    image_size: int = 64,
    modalities: Iterable[str] = ("image",),
    output_preset: Preset | None = None,
) -> SynthReport:
    """Write the synthetic dataset under `out_dir` (files there with the same names are replaced).

    Args:
        out_dir: The output folder (created if missing).
        train: Training images; each gives one caption pair and one conversation.
        heldout: Held-out images; each gives one question, kinds taken in turn.
        seed: Seed of the training images; held-out ones use seed + HELDOUT_SEED_OFFSET.
        image_size: Image side in pixels.
        modalities: What to write: "image" (always needed) and any of "video", "audio",
            "event", each with `train` training and `heldout` held-out files drawn from seeds
            of its own; "timestamps"; "t2x" (needs `output_preset`).
        output_preset: The preset whose decoders embed the t2x captions (its checkpoints
            generated).

    Raises:
        InvalidArgumentError: A count or the image size is out of range, or a modality is
            unknown or "image" is missing.
    """
    wanted = list(dict.fromkeys(modalities))
    if "image" not in wanted or not set(wanted) <= {*MODALITIES, TIMESTAMPS, T2X}:
        raise InvalidArgumentError(
            f"synth: modalities: expected 'image' and any of {[*MODALITIES[1:], TIMESTAMPS, T2X]}, got {wanted}"
        )
    if T2X in wanted and (output_preset is None or not output_preset.outputs):
        raise InvalidArgumentError(
            "synth: modalities: t2x needs a preset with outputs (image/audio/video generation), "
            f"got {output_preset.name if output_preset else 'none'}"
        )
    if train < 1 or heldout < 0:
        raise InvalidArgumentError(f"synth: expected train >= 1 and heldout >= 0, got {train} and {heldout}")
    if not 16 <= image_size <= 1024:
        raise InvalidArgumentError(f"synth: image_size: expected 16 to 1024 pixels, got {image_size}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)

    rng = random.Random(seed)
    scenes = [_scene(rng, image_size) for _ in range(train)]
    paths = _write_images(out_dir, "train", scenes, image_size)
    captions = [{"image": p, "caption": _caption(rng, s)} for p, s in zip(paths, scenes, strict=True)]
    conversations = [
        {"id": f"train-{i:05d}", "image": p, "conversations": _conversation(rng, s, _kinds(rng))}
        for i, (p, s) in enumerate(zip(paths, scenes, strict=True))
    ]

    held_rng = random.Random(seed + HELDOUT_SEED_OFFSET)
    held_scenes = [_scene(held_rng, image_size) for _ in range(heldout)]
    held_paths = _write_images(out_dir, "heldout", held_scenes, image_size)
    held = [
        {
            "id": f"heldout-{i:05d}",
            "image": p,
            "conversations": _conversation(held_rng, s, [KINDS[i % len(KINDS)]]),
            "kind": KINDS[i % len(KINDS)],
            "answer": {"color": s.color, "shape": s.shape},
        }
        for i, (p, s) in enumerate(zip(held_paths, held_scenes, strict=True))
    ]

    report = SynthReport(
        out_dir=out_dir,
        captions=out_dir / "captions.json",
        train=out_dir / "train.json",
        heldout=out_dir / "heldout.json",
        meta=out_dir / "meta.json",
        train_images=train,
        heldout_images=heldout,
        train_samples=len(conversations),
    )
    media = {m: _synthesize_media(out_dir, m, train, heldout, seed) for m in MODALITIES if m in wanted[1:]}
    if TIMESTAMPS in wanted:
        media[TIMESTAMPS] = _synthesize_timestamps(out_dir, train, heldout, seed)
    report = dataclasses.replace(report, media=media)
    outputs_meta = None
    if T2X in wanted:
        from services.trainer._synth_outputs import write_t2x

        assert output_preset is not None  # checked above
        outputs_meta = write_t2x(out_dir, output_preset, train, heldout, seed)
    _dump(report.captions, captions)
    _dump(report.train, conversations)
    _dump(report.heldout, held)
    _dump(
        report.meta,
        {
            "seed": seed,
            "heldout_seed": seed + HELDOUT_SEED_OFFSET,
            "image_size": image_size,
            "train_images": train,
            "heldout_images": heldout,
            "caption_pairs": len(captions),
            "train_samples": len(conversations),
            "heldout_samples": len(held),
            "colors": list(COLORS),
            "shapes": list(SHAPES),
            "backgrounds": list(BACKGROUNDS),
            "files": {"captions": "captions.json", "train": "train.json", "heldout": "heldout.json"},
            "modalities": _media_meta(report),
            **({T2X: outputs_meta} if outputs_meta else {}),
        },
    )
    return report


def _media_meta(report: SynthReport) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "image": {"folder": "images", "train": report.train_images, "heldout": report.heldout_images}
    }
    if not report.media:
        return meta
    from services.trainer._synth_media import settings

    for name, media in report.media.items():
        meta[name] = {
            "folder": name,
            "train": media.train_items,
            "heldout": media.heldout_items,
            "files": {
                "captions": media.captions.name,
                "train": media.train.name,
                "heldout": media.heldout.name,
            },
            "kinds": list(MEDIA_KINDS[name]) if name in MEDIA_KINDS else list(TIMED_KINDS),
            "settings": settings()[name],
        }
    return meta


def _synthesize_media(out_dir: Path, modality: str, train: int, heldout: int, seed: int) -> MediaReport:
    """Write one media modality's files, caption pairs and conversations (see the module docstring)."""
    from services.trainer._synth_media import write_media

    kinds = list(MEDIA_KINDS[modality])
    placeholder = f"<{modality}>"

    def ask(rng: random.Random, kind: str, words: str, answer: Mapping[str, str]) -> list[dict[str, str]]:
        _, questions, reference = MEDIA_KINDS[modality][kind]
        text = reference.format(
            words=f"{_article(words)} {words}", Words=f"{_article(words).title()} {words}", **answer
        )
        return [
            {"from": "human", "value": f"{placeholder}\n{rng.choice(questions)}"},
            {"from": "gpt", "value": text},
        ]

    rng = random.Random(f"{seed}:{modality}")
    items = write_media(out_dir, modality, "train", train, rng)
    captions = [{"media": it.rel, "caption": f"{_article(it.words)} {it.words}"} for it in items]
    conversations = [
        {
            "id": f"{modality}-train-{i:05d}",
            "media": it.rel,
            "conversations": ask(rng, rng.choice(kinds), it.words, it.answer),
        }
        for i, it in enumerate(items)
    ]
    held_rng = random.Random(f"{seed + HELDOUT_SEED_OFFSET}:{modality}")
    held_items = write_media(out_dir, modality, "heldout", heldout, held_rng)
    held = [
        {
            "id": f"{modality}-heldout-{i:05d}",
            "media": it.rel,
            "conversations": ask(held_rng, kinds[i % len(kinds)], it.words, it.answer),
            "kind": kinds[i % len(kinds)],
            "answer": it.answer,
        }
        for i, it in enumerate(held_items)
    ]
    report = MediaReport(
        captions=out_dir / f"captions_{modality}.json",
        train=out_dir / f"train_{modality}.json",
        heldout=out_dir / f"heldout_{modality}.json",
        train_items=len(items),
        heldout_items=len(held_items),
    )
    _dump(report.captions, captions)
    _dump(report.train, conversations)
    _dump(report.heldout, held)
    return report


def _article(words: str) -> str:
    return "an" if words[:1] in "aeiou" else "a"


def _kinds(rng: random.Random) -> list[str]:
    return rng.sample(KINDS, k=rng.choice((1, 2)))


def score_reply(reply: str, sample: Mapping[str, Any]) -> bool:
    """Whether a model reply answers a held-out sample correctly.

    A colour question needs the right colour word and no other colour word; a shape question
    the right shape word and no other shape word; a description both. Background colours
    (white, black, gray) are not shape colours and never count against a reply. The rule is
    `services.common.answer_words.shapes_correct` (the one `modalmesh eval shapes` uses); this
    adds the checks of the sample.

    Args:
        reply: The model's reply text.
        sample: A record of heldout.json, with "kind" and "answer": {"color", "shape"}.

    Raises:
        InvalidArgumentError: The sample has no valid kind or answer.
    """
    kind, answer = sample.get("kind"), sample.get("answer")
    if kind not in KINDS or not isinstance(answer, Mapping):
        raise InvalidArgumentError(
            f"held-out sample: expected 'kind' in {list(KINDS)} and an 'answer' object, "
            f"got kind {kind!r} and answer {answer!r}"
        )
    if answer.get("color") not in COLORS or answer.get("shape") not in SHAPES:
        raise InvalidArgumentError(
            f"held-out sample: answer: expected a known color and shape, got {answer!r}"
        )
    return shapes_correct(reply, kind, answer, COLORS, SHAPES)


def score_reply_for(modality: str, reply: str, sample: Mapping[str, Any]) -> bool:
    """Whether a model reply answers a held-out sample of `modality` correctly.

    "image" is `score_reply`. For the others each answer field the sample's kind asks about
    (see `MEDIA_KINDS`: a video's colour, shape and direction, a tone's pitch, an edge's
    direction) needs its right word in the reply and no other word of that field's vocabulary.

    Args:
        modality: "image", "video", "audio" or "event".
        reply: The model's reply text.
        sample: A record of that modality's held-out file, with "kind" and "answer".

    Raises:
        InvalidArgumentError: The modality is unknown, or the sample has no valid kind or answer.
    """
    if modality == "image":
        return score_reply(reply, sample)
    if modality not in MEDIA_KINDS:
        raise InvalidArgumentError(
            f"held-out sample: modality: expected one of {list(MODALITIES)}, got {modality!r}"
        )
    kinds, kind, answer = MEDIA_KINDS[modality], sample.get("kind"), sample.get("answer")
    if kind not in kinds or not isinstance(answer, Mapping):
        raise InvalidArgumentError(
            f"held-out {modality} sample: expected 'kind' in {list(kinds)} and an 'answer' object, "
            f"got kind {kind!r} and answer {answer!r}"
        )
    fields = kinds[kind][0]
    if any(answer.get(f) not in VOCABULARY[f] for f in fields):
        raise InvalidArgumentError(
            f"held-out {modality} sample: answer: expected known {', '.join(fields)}, got {answer!r}"
        )
    words = reply_words(reply)
    return all(names_only(words, answer[f], VOCABULARY[f]) for f in fields)


def _timed_conversation(rng: random.Random, kind: str, answer: Mapping[str, str]) -> dict[str, Any]:
    """One E.T. Instruct record's question, reply and times for a timed video."""
    what = f"{answer['color']} {answer['shape']}"
    start, end = int(answer["start"]), int(answer["end"])
    src: list[float] = []
    tgt: list[float] = []
    if kind == "appear":
        question, reply, tgt = f"When does the {what} appear?", f"At {TIME_TOKEN} seconds.", [start]
    elif kind == "span":
        question = f"When is the {what} visible?"
        reply, tgt = f"From {TIME_TOKEN} to {TIME_TOKEN} seconds.", [start, end]
    else:
        at = rng.randrange(TIMED_SECONDS)
        question, src = f"What is shown at {TIME_TOKEN} seconds?", [at]
        reply = f"A {what}." if start <= at < end else "Nothing is shown."
    return {
        "src": [float(t) for t in src] or None,
        "tgt": [float(t) for t in tgt] or None,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": reply}],
    }


def _synthesize_timestamps(out_dir: Path, train: int, heldout: int, seed: int) -> MediaReport:
    """Write the E.T. Instruct-style set (see the module docstring)."""
    from services.trainer._synth_media import write_timed_videos

    def records(items: list[Any], rng: random.Random, prefix: str, held: bool) -> list[dict[str, Any]]:
        out = []
        for i, it in enumerate(items):
            kind = TIMED_KINDS[i % len(TIMED_KINDS)] if held else rng.choice(TIMED_KINDS)
            record = {"id": f"{prefix}-{i:05d}", "video": it.rel, "duration": float(TIMED_SECONDS)}
            record |= _timed_conversation(rng, kind, it.answer)
            if held:
                record |= {"kind": kind, "answer": dict(it.answer)}
            out.append(record)
        return out

    rng = random.Random(f"{seed}:{TIMESTAMPS}")
    items = write_timed_videos(out_dir, "train", train, rng)
    held_rng = random.Random(f"{seed + HELDOUT_SEED_OFFSET}:{TIMESTAMPS}")
    held_items = write_timed_videos(out_dir, "heldout", heldout, held_rng)
    report = MediaReport(
        captions=out_dir / f"captions_{TIMESTAMPS}.json",
        train=out_dir / "etinstruct.json",
        heldout=out_dir / "heldout_etinstruct.json",
        train_items=len(items),
        heldout_items=len(held_items),
    )
    captions = [
        {"video": it.rel, "caption": f"a {it.words} from {it.answer['start']} to {it.answer['end']} seconds"}
        for it in items
    ]
    _dump(report.captions, captions)
    _dump(report.train, records(items, rng, "etinstruct-train", held=False))
    _dump(report.heldout, records(held_items, held_rng, "etinstruct-heldout", held=True))
    return report
