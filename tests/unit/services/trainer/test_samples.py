"""Readers beyond LLaVA images: video/audio/event caption pairs under every accepted key, E.T.
Instruct records with their `<vid>` times (good and bad), what `modalmesh data synth` writes,
and the encoder's time tokens, instructions, per-item frames and summed spans."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.common.content import MediaPart, TextPart, Turn
from services.common.errors import InvalidArgumentError
from services.models.prompt.templates import get_template
from services.trainer.datasets import (
    IGNORE_INDEX,
    BadSampleError,
    DatasetSpec,
    MediaFile,
    MediaSlots,
    Sample,
    SupervisedEncoder,
    load_samples,
    media_files,
)


def write(tmp_path: Path, records: list[Any], name: str = "data.json") -> Path:
    for name_ in ("a.mp4", "b.wav", "c.npy"):
        (tmp_path / name_).write_bytes(b"x")
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def load(path: Path, fmt: str, modality: str, **kw: Any):
    return load_samples(
        DatasetSpec(format=fmt, path=path, modality=modality),
        placeholder="<image>",
        max_bad_ratio=1.0,
        **kw,
    )


@pytest.mark.parametrize(
    ("modality", "record"),
    [
        ("video", {"video": "a.mp4", "caption": "a cat"}),
        ("video", {"video_name": "a.mp4", "caption": "a cat"}),  # NExT-GPT
        ("video", {"input_video": "a.mp4", "caption": "a cat"}),  # NExT-GPT's new code base
        ("audio", {"audio": "b.wav", "caption": "a cat"}),
        ("audio", {"audio_name": "b.wav", "caption": "a cat"}),
        ("event", {"event": "c.npy", "caption": "a cat"}),
        ("event", {"media": "c.npy", "caption": "a cat"}),
    ],
)
def test_caption_pairs_of_each_modality_and_key(
    tmp_path: Path, modality: str, record: dict[str, Any]
) -> None:
    samples, report = load(write(tmp_path, [record]), "captions", modality)
    assert report.kept == 1
    [sample] = samples
    assert sample.media[0].modality == modality and sample.media[0].path.parent == tmp_path
    assert sample.turns[1].parts == (TextPart("a cat"),)


def test_event_chat_and_pandagpt_conversation_key(tmp_path: Path) -> None:
    record = {"event": "c.npy", "conversation": [{"from": "human", "value": "<image>\nWhich way?"}, {"from": "gpt", "value": "Left."}]}  # fmt: skip
    [sample], _ = load(write(tmp_path, [record]), "llava", "event")
    assert sample.turns[0].parts == (
        MediaPart(MediaFile("event", tmp_path / "c.npy")),
        TextPart("Which way?"),
    )


def test_two_media_keys_are_a_bad_sample(tmp_path: Path) -> None:
    good = {"video": "a.mp4", "caption": "x"}
    _, report = load(write(tmp_path, [good, {**good, "video_name": "a.mp4"}]), "captions", "video")
    assert report.reasons == {"bad_field": 1} and "got several" in report.examples[0]


def et(
    src: Any = None, tgt: Any = None, question: str = "When?", answer: str = "At <vid>.", **extra: Any
) -> dict[str, Any]:
    convs = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"video": "a.mp4", "duration": 10, "src": src, "tgt": tgt, "conversations": convs, **extra}


def test_etinstruct_times_follow_the_text_order(tmp_path: Path) -> None:
    multi = et(src=[2.0], tgt=[3, 7.5], question="After <vid> s?", answer="From <vid> to <vid>.")
    multi["conversations"] += [
        {"from": "human", "value": "And at <vid>?"},
        {"from": "gpt", "value": "At <vid>."},
    ]
    multi["src"], multi["tgt"] = [2.0, 9.0], [3, 7.5, 4]
    [one, two], report = load(
        write(tmp_path, [et(tgt=[4]), multi]), "etinstruct", "video", time_token="<vid>"
    )
    assert report.kept == 2
    assert one.times == (4.0,)
    assert two.times == (2.0, 3.0, 7.5, 9.0, 4.0)  # user turns take src, replies tgt, in order
    assert one.turns[0].parts[0] == MediaPart(one.media[0])  # no placeholder: the video opens the question
    assert one.media[0].path.name == "a.mp4"


@pytest.mark.parametrize(
    ("record", "reason", "message"),
    [
        (et(tgt=[1, 2]), "time_token_count", "2 in replies (tgt), got 0 and 1"),
        (et(src=[1]), "time_token_count", "got 0 and 1"),
        (et(tgt=[11]), "time_out_of_range", "expected seconds in [0, 10] (the duration), got 11"),
        (et(tgt=[-1]), "time_out_of_range", "got -1"),
        (et(tgt=["1"]), "bad_field", "tgt: expected a list of seconds"),
        (et(tgt=[1], duration=0), "bad_field", "duration: expected seconds > 0, got 0"),
        ({"video": "a.mp4", "caption": "x"}, "missing_field", "conversations"),
    ],
)
def test_etinstruct_bad_samples_are_counted(tmp_path: Path, record: Any, reason: str, message: str) -> None:
    _, report = load(write(tmp_path, [et(tgt=[4]), record]), "etinstruct", "video", time_token="<vid>")
    assert report.reasons == {reason: 1}, report.examples
    assert message in report.examples[0]


def test_time_tokens_without_times_and_etinstruct_without_heads(tmp_path: Path) -> None:
    llava = {"video": "a.mp4", "conversations": [{"from": "human", "value": "When?"}, {"from": "gpt", "value": "At <vid>."}]}  # fmt: skip
    _, report = load(write(tmp_path, [llava, {**llava, "conversations": [*llava["conversations"][:1], {"from": "gpt", "value": "Soon."}]}]), "llava", "video", time_token="<vid>")  # fmt: skip
    assert report.reasons == {"time_token_count": 1} and "gives no times" in report.examples[0]
    with pytest.raises(InvalidArgumentError, match="needs a preset with timestamp heads"):
        load(write(tmp_path, [et(tgt=[4])]), "etinstruct", "video")


def test_media_files_is_a_quiet_first_pass(tmp_path: Path) -> None:
    path = write(tmp_path, [{"video": "a.mp4"}, 3, {"video": 5}, {"media": "a.mp4"}, {"video": "b.wav"}])
    assert media_files(DatasetSpec(format="captions", path=path, modality="video")) == [
        tmp_path / "a.mp4",
        tmp_path / "b.wav",
    ]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.trainer.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, train=6, heldout=3, seed=1, modalities=["image", "video", "audio", "event", "timestamps"])
    return out


@pytest.mark.parametrize(
    ("name", "fmt", "modality"),
    [
        ("captions_video.json", "captions", "video"),
        ("captions_audio.json", "captions", "audio"),
        ("captions_event.json", "captions", "event"),
        ("captions_timestamps.json", "captions", "video"),
        ("etinstruct.json", "etinstruct", "video"),
        ("heldout_etinstruct.json", "etinstruct", "video"),
    ],
)
def test_synthetic_sets_are_readable(synth_dir: Path, name: str, fmt: str, modality: str) -> None:
    _, report = load_samples(
        DatasetSpec(format=fmt, path=synth_dir / name, modality=modality),
        placeholder="<image>",
        time_token="<vid>",
    )
    assert report.bad == 0 and report.kept == len(json.loads((synth_dir / name).read_text()))


def test_synthetic_etinstruct_times_match_the_video(synth_dir: Path) -> None:
    from services.models.media.video import FrameSampling, VideoLimits, decode_video

    record = json.loads((synth_dir / "heldout_etinstruct.json").read_text())[0]  # kind "appear"
    assert record["kind"] == "appear" and record["tgt"] == [float(record["answer"]["start"])]
    video = decode_video(
        (synth_dir / record["video"]).read_bytes(),
        sampling=FrameSampling(fps=1.0, max_frames=8),
        limits=VideoLimits(),
    )
    frames = [f.astype(int) for f in video.frames]
    start, end = int(record["answer"]["start"]), int(record["answer"]["end"])
    empty = frames[end] if end < 8 else frames[start - 1]
    changed = [i for i, f in enumerate(frames) if abs(f - empty).mean() > 10]
    assert changed == list(range(start, end)), (start, end)


# -- encoding: time tokens, instructions, frames, summed spans -------------------------------------


class Tok:
    """A word tokenizer: each space-separated word (or special) is one id."""

    bos_token_id, unk_token_id = 1, 0
    vocab = {"<unk>": 0, "<s>": 1, "<image>": 2, "<vid>": 3}

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.vocab.get(token, 0)

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, Any]:
        out = []
        for text in texts:
            words = text.replace("<vid>", " <vid> ").replace("\n", " \n ").split(" ")
            out.append([self.vocab.setdefault(w, len(self.vocab)) for w in words if w])
        return {"input_ids": out}


def test_encoder_places_time_tokens_frames_and_instructions() -> None:
    tok = Tok()
    slots = {"video": MediaSlots("<image>", 2, 8, 2, tokens_for_frames=lambda f: f)}
    enc = SupervisedEncoder(
        tok, get_template("plain"), slots, max_length=64, time_token="<vid>",
        frames={Path("a.mp4"): 5}, errors={Path("bad.mp4"): "not a video"},
    )  # fmt: skip

    def turns(path: str) -> tuple[Turn, ...]:
        user = Turn("user", (MediaPart(MediaFile("video", Path(path))), TextPart("When?")))
        return (user, Turn("assistant", (TextPart("At <vid> ."),)))

    e = enc.encode(Sample("s", turns("a.mp4"), times=(3.0,)))
    assert e.media_spans == [(1, 5)]  # BOS, then 5 frames -> 5 tokens
    [(pos, seconds)] = e.time_tokens
    assert e.input_ids[pos] == 3 and seconds == 3.0 and e.labels[pos] != IGNORE_INDEX
    assert e.instructions == ["When?"]
    with pytest.raises(BadSampleError, match="expected 2 time token"):
        enc.encode(Sample("s", turns("a.mp4"), times=(3.0, 4.0)))
    with pytest.raises(BadSampleError, match=r"bad\.mp4: not a video"):
        enc.encode(Sample("s", turns("bad.mp4"), times=(3.0,)))


def test_encoder_sums_one_turns_media_into_one_span() -> None:
    tok = Tok()
    slots = {m: MediaSlots(f"<{m}>", 2, 1, 2) for m in ("image", "audio")}
    enc = SupervisedEncoder(tok, get_template("plain"), slots, max_length=64, combine="sum")
    media = (MediaPart(MediaFile("image", Path("i"))), MediaPart(MediaFile("audio", Path("a"))))
    e = enc.encode(Sample("s", (Turn("user", media), Turn("assistant", (TextPart("x"),)))))
    assert e.media_spans == [(1, 1), (1, 1)] and e.input_ids.count(2) == 1


def test_encoder_sums_per_modality_each_its_own_span() -> None:
    tok = Tok()
    slots = {m: MediaSlots(f"<{m}>", 2, 1, 2) for m in ("image", "audio")}
    enc = SupervisedEncoder(tok, get_template("plain"), slots, max_length=64, combine="sum_per_modality")
    media = (MediaFile("image", Path("i")), MediaFile("audio", Path("a")), MediaFile("image", Path("j")))
    turns = (Turn("user", tuple(MediaPart(m) for m in media)), Turn("assistant", (TextPart("x"),)))
    e = enc.encode(Sample("s", turns))
    assert e.media_spans[0] == e.media_spans[2] == (1, 1) != e.media_spans[1]
    assert e.input_ids.count(2) == 2  # two placeholders: the images summed, the audio
