"""Audio decoding (every kind of bad input), resampling, clip sampling and ImageBind's melspec."""

from __future__ import annotations

import io
import math
from fractions import Fraction

import numpy as np
import pytest
import soundfile as sf

from services.common.errors import InvalidArgumentError, PayloadTooLargeError
from services.models.media._fbank import kaldi_fbank
from services.models.media.audio import (
    IMAGEBIND_MEAN,
    IMAGEBIND_STD,
    AudioLimits,
    clip_bounds,
    clip_timepoints,
    clips,
    decode_audio,
    imagebind_audio,
    imagebind_melspec,
    resample,
    sniff_audio,
)
from tests.helpers.media import make_audio, png_bytes

LIMITS = AudioLimits(max_bytes=5_000_000, max_seconds=30.0)
FORMATS = ["wav", "flac", "ogg", "mp3"]


def _sine(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(round(rate * seconds)) / rate)).astype(np.float32)


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum)) * rate / len(x)


def _amplitude(x: np.ndarray) -> float:
    return math.sqrt(2 * float(np.mean(x.astype(np.float64) ** 2)))


def _wav(samples: np.ndarray, rate: int, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _bad(data: bytes, match: str, *, hint: str | None = None, limits: AudioLimits = LIMITS) -> None:
    with pytest.raises(InvalidArgumentError, match=match) as info:
        decode_audio(data, fmt_hint=hint, limits=limits)
    assert info.value.http_status in (400, 413)


# --- decoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rate", [16000, 44100])
def test_decodes_each_format(fmt: str, rate: int) -> None:
    data = make_audio(1.5, rate, fmt, freq=440.0)
    for hint in (fmt, fmt.upper(), None):
        wave = decode_audio(data, fmt_hint=hint, limits=LIMITS)
        assert wave.sample_rate == rate
        assert wave.samples.dtype == np.float32 and wave.samples.ndim == 1
        assert abs(wave.seconds - 1.5) < 0.06  # mp3 and vorbis add or trim a few ms
        middle = wave.samples[rate // 4 : rate]
        assert abs(_peak_hz(middle, rate) - 440.0) < 3.0
        assert abs(_amplitude(middle) - 0.5) < 0.03


def test_wav_samples_are_scaled_like_torchaudio_load() -> None:
    pcm = np.array([0, 16384, -32768, 32767, 1] * 200, dtype=np.int16)
    wave = decode_audio(_wav(pcm, 16000), fmt_hint="wav", limits=LIMITS)
    np.testing.assert_array_equal(wave.samples, pcm.astype(np.float32) / 32768)


def test_stereo_is_averaged_or_first_channel() -> None:
    left = _sine(300, 16000, 1.0)
    data = _wav(np.stack([left, 0.5 * left], axis=1), 16000, subtype="FLOAT")
    mean = decode_audio(data, fmt_hint="wav", limits=LIMITS)
    first = decode_audio(data, fmt_hint="wav", limits=LIMITS, mix="first")
    np.testing.assert_allclose(mean.samples, 0.75 * left, atol=1e-6)
    np.testing.assert_allclose(first.samples, left, atol=1e-7)
    both = decode_audio(data, fmt_hint="wav", limits=LIMITS, mix="first_and_mean")
    assert both.channel_mean is not None and mean.channel_mean is None and first.channel_mean is None
    np.testing.assert_array_equal(both.samples, first.samples)
    np.testing.assert_array_equal(both.channel_mean, mean.samples)
    mono = decode_audio(
        _wav(left, 16000, subtype="FLOAT"), fmt_hint="wav", limits=LIMITS, mix="first_and_mean"
    )
    assert mono.channel_mean is None  # one channel: its mean is itself


def test_imagebind_subtracts_the_mean_over_all_channels() -> None:
    """ImageBind's `waveform -= waveform.mean()` averages every channel of the clip, in place on
    the shared waveform, while its fbank reads channel 0: with channels of different offsets
    the overlapping clips' boundary frames show which mean was taken."""
    left = _sine(300, 16000, 3.0) + np.float32(0.05)
    right = _sine(450, 16000, 3.0) + np.float32(0.4)
    average = ((left + right) / 2).astype(np.float32)
    got = imagebind_audio(left, 16000, channel_mean=average, last_clip_at_end=True)
    work, reference = left.astype(np.float64), average.astype(np.float64)
    want = []
    for start, end in clip_bounds(len(left), 16000, last_clip_at_end=True):
        offset = reference[start:end].mean()
        work[start:end] -= offset
        reference[start:end] -= offset
        want.append(imagebind_melspec(work[start:end]))
    np.testing.assert_allclose(got, np.stack(want), atol=1e-6)
    alone = imagebind_audio(left, 16000, last_clip_at_end=True)  # channel 0's own mean
    assert np.abs(got - alone).max() > 1e-2


def test_id3_tagged_mp3_is_sniffed_and_decoded() -> None:
    mp3 = make_audio(1.0, 16000, "mp3")
    body = b"TIT2" + (5).to_bytes(4, "big") + b"\x00\x00\x00tone"
    tag = b"ID3\x03\x00\x00" + bytes([0, 0, 0, len(body)]) + body
    assert sniff_audio(tag + mp3) == "mp3"
    assert sniff_audio(tag + make_audio(1.0, 16000, "flac")) == "flac"
    assert decode_audio(tag + mp3, fmt_hint="mp3", limits=LIMITS).sample_rate == 16000


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", "wav"),
        (b"RF64\xff\xff\xff\xffWAVEds64", "wav"),
        (b"fLaC\x00\x00\x00\x22", "flac"),
        (b"OggS\x00\x02", "ogg"),
        (b"\xff\xfb\x90\x64", "mp3"),
        (b"\xff\xf1\x50\x80", "aac"),
        (b"FORM\x00\x00\x00\x00AIFFCOMM", "aiff"),
        (b"\x00\x00\x00\x20ftypM4A ", "mp4"),
        (b"\x1aE\xdf\xa3\x01\x00", "webm"),
        (b"RIFF\x00\x00\x00\x00AVI LIST", "riff"),
        (b"\x89PNG\r\n\x1a\n", None),
        (b"\xff\xd8\xff\xe0", None),
    ],
)
def test_sniff(head: bytes, fmt: str | None) -> None:
    assert sniff_audio(head + bytes(32)) == fmt


def test_empty_bytes() -> None:
    _bad(b"", r"empty audio: expected the bytes of a wav, mp3, flac or ogg file, got 0 bytes")


def test_png_is_not_audio() -> None:
    _bad(
        png_bytes(),
        r"not audio: expected the bytes of a wav, mp3, flac or ogg file, got \d+ bytes starting with 89 50 4e 47",
    )


def test_random_bytes_are_not_audio() -> None:
    data = b"\x00" + np.random.default_rng(0).bytes(3000)
    _bad(data, "not audio: expected")
    _bad(data, "not audio: expected", hint="wav")


@pytest.mark.parametrize("hint", ["aac", "m4a", "opus", "pcm16", ""])
def test_unsupported_hint(hint: str) -> None:
    _bad(
        make_audio(0.5, 16000), rf"audio format: expected one of wav, mp3, flac, ogg, got '{hint}'", hint=hint
    )


def test_aiff_bytes_are_refused_by_name() -> None:
    aiff = _wav(_sine(440, 16000, 0.5), 16000, fmt="AIFF")
    _bad(aiff, "unsupported audio format: expected one of wav, mp3, flac, ogg, got aiff")
    _bad(aiff, "unsupported audio format", hint="wav")


@pytest.mark.parametrize(("fmt", "hint"), [("wav", "mp3"), ("mp3", "wav"), ("flac", "ogg"), ("ogg", "flac")])
def test_hint_that_contradicts_the_bytes(fmt: str, hint: str) -> None:
    _bad(
        make_audio(0.5, 16000, fmt),
        rf"audio format mismatch: declared '{hint}', expected {hint} bytes, got a {fmt} file",
        hint=hint,
    )


@pytest.mark.parametrize("cut", [0.3, 0.9, 0.999])
def test_truncated_wav(cut: float) -> None:
    data = make_audio(1.0, 16000, "wav")
    _bad(
        data[: int(len(data) * cut)],
        r"corrupt or truncated audio: expected a complete wav file, got \d+ bytes that fail to decode: its data chunk declares 32000 bytes",
    )


def test_wav_cut_inside_its_header() -> None:
    _bad(make_audio(1.0, 16000, "wav")[:30], "corrupt or truncated audio: expected a complete wav file")


def test_truncated_flac() -> None:
    data = make_audio(1.0, 16000, "flac")
    _bad(data[: len(data) // 2], "corrupt or truncated audio: expected a complete flac file")


def test_garbage_after_an_ogg_signature() -> None:
    _bad(
        b"OggS" + np.random.default_rng(1).bytes(500),
        "corrupt or truncated audio: expected a complete ogg file",
    )


def test_zero_length_audio() -> None:
    _bad(
        _wav(np.zeros(0, dtype=np.float32), 16000),
        "empty audio: expected at least one sample, got a wav file with none",
    )


def test_shorter_than_one_fbank_frame() -> None:
    _bad(
        make_audio(0.01, 16000),
        r"audio too short: expected at least 0.025 s .*, got 0.0100 s \(160 samples at 16000 Hz\)",
    )
    # 1100 samples at 44.1 kHz become ceil(399.1) = 400 at 16 kHz, one frame; 1099 give 399
    assert (
        len(decode_audio(_wav(_sine(440, 44100, 1100 / 44100), 44100), fmt_hint="wav", limits=LIMITS).samples)
        == 1100
    )
    _bad(_wav(_sine(440, 44100, 1099 / 44100), 44100), r"audio too short: .* \(1099 samples at 44100 Hz\)")


@pytest.mark.parametrize("fmt", FORMATS)
def test_silence(fmt: str) -> None:
    _bad(make_audio(1.0, 16000, fmt, amplitude=0.0), r"audio is silent: expected some sound, got 1\.\d+ s")


def test_dc_offset_alone_is_silent_but_one_lsb_is_not() -> None:
    _bad(_wav(np.full(8000, 0.25, dtype=np.float32), 16000), "audio is silent")
    pcm = np.zeros(8000, dtype=np.int16)
    pcm[100] = 1
    assert decode_audio(_wav(pcm, 16000), fmt_hint=None, limits=LIMITS).samples.max() == 2.0**-15


@pytest.mark.parametrize("fmt", FORMATS)
def test_too_long(fmt: str) -> None:
    _bad(
        make_audio(2.5, 16000, fmt),
        r"audio too long: expected at most 2.0 s, got",
        limits=AudioLimits(max_seconds=2.0),
    )
    assert decode_audio(make_audio(1.9, 16000, fmt), fmt_hint=fmt, limits=AudioLimits(max_seconds=2.0))


def test_too_many_bytes_is_413() -> None:
    data = make_audio(1.0, 16000)
    with pytest.raises(
        PayloadTooLargeError, match=rf"audio too large: expected at most 1000 bytes, got {len(data)}"
    ) as info:
        decode_audio(data, fmt_hint="wav", limits=AudioLimits(max_bytes=1000))
    assert info.value.http_status == 413


def test_sample_rate_out_of_range() -> None:
    _bad(_wav(_sine(100, 500, 1.0), 500), r"audio sample rate: expected 1000 to 192000 Hz, got 500 Hz")


# --- resampling -------------------------------------------------------------------------------


def _direct_resample(x: np.ndarray, orig: int, new: int, width: int = 6, rolloff: float = 0.99) -> np.ndarray:
    """Every output sample from every input sample, with torchaudio's kernel formula (float64)."""
    base = min(orig, new) * rolloff
    i = np.arange(len(x))
    out = np.empty(-(-new * len(x) // orig))
    for j in range(len(out)):
        t = np.clip(base * (i / orig - j / new), -width, width)
        kernel = np.sinc(t) * np.cos(t * np.pi / width / 2) ** 2 * base / orig
        out[j] = kernel @ x
    return out


@pytest.mark.parametrize(
    ("orig", "new"),
    [(44100, 16000), (48000, 16000), (8000, 16000), (22050, 16000), (44101, 16000), (12345, 16000)],
)
def test_resample_matches_the_direct_formula(orig: int, new: int) -> None:
    x = np.random.default_rng(orig).uniform(-1, 1, 700).astype(np.float32)
    np.testing.assert_allclose(
        resample(x, orig, new), _direct_resample(x.astype(np.float64), orig, new), atol=2e-6
    )


@pytest.mark.parametrize("orig", [8000, 11025, 22050, 32000, 44100, 48000, 96000, 44101])
def test_resampled_sine_keeps_frequency_and_amplitude(orig: int) -> None:
    y = resample(_sine(1000.0, orig, 2.0), orig, 16000)
    assert len(y) == 32000
    middle = y[4000:-4000]
    assert abs(_peak_hz(middle, 16000) - 1000.0) < 1.0
    assert abs(_amplitude(middle) - 0.5) < 0.005  # within 1 %


@pytest.mark.parametrize(("orig", "tone"), [(48000, 12000.0), (44100, 11000.0), (32000, 14000.0)])
def test_tone_above_new_nyquist_is_removed(orig: int, tone: float) -> None:
    y = resample(_sine(tone, orig, 1.0), orig, 16000)
    assert 20 * math.log10(_amplitude(y[2000:-2000]) / 0.5) < -40.0  # would alias to 16000 - tone


def test_resample_lengths_and_identity() -> None:
    x = _sine(440, 44100, 0.1)
    assert len(resample(x, 44100, 16000)) == math.ceil(len(x) * 16000 / 44100)
    assert len(resample(x[:7], 44100, 16000)) == 3
    np.testing.assert_array_equal(resample(x, 16000, 16000), x)
    with pytest.raises(ValueError, match="resample: expected"):
        resample(x, 0, 16000)


# --- clips ------------------------------------------------------------------------------------


def test_clip_timepoints_pytorchvideo_0_1_5() -> None:
    points = clip_timepoints(10.0)
    assert points == [(0, 2), (Fraction(8, 3), Fraction(14, 3)), (Fraction(16, 3), Fraction(22, 3))]


def test_clip_timepoints_last_clip_at_end() -> None:
    assert clip_timepoints(10.0, last_clip_at_end=True) == [(0, 2), (4, 6), (8, 10)]
    assert clip_timepoints(10.0, num_clips=1, last_clip_at_end=True) == [(0, 2)]


def test_audio_shorter_than_a_clip_repeats_it_whole() -> None:
    assert clip_timepoints(1.3) == [(0, 2)] * 3
    assert clip_bounds(20800, 16000) == [(0, 20800)] * 3
    parts = clips(np.arange(20800, dtype=np.float32), 16000)
    assert [len(p) for p in parts] == [20800] * 3


def test_clip_bounds_floor_like_imagebind() -> None:
    assert clip_bounds(160000, 16000) == [(0, 32000), (42666, 74666), (85333, 117333)]
    n = 16000 * 5 + 7  # an inexact float duration
    for start, end in clip_bounds(n, 16000, last_clip_at_end=True):
        assert 0 <= start < end <= n and end - start <= 32000
    assert clip_bounds(n, 16000, last_clip_at_end=True)[-1][1] in (n - 1, n)  # int() of a float-made end


def test_clip_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="num_clips >= 1"):
        clip_timepoints(3.0, num_clips=0)


# --- ImageBind melspec ------------------------------------------------------------------------


def test_melspec_of_a_full_clip() -> None:
    clip = _sine(440, 16000, 2.0) + np.random.default_rng(0).normal(0, 0.01, 32000).astype(np.float32)
    got = imagebind_melspec(clip)
    assert got.shape == (1, 128, 204) and got.dtype == np.float32
    x = clip.astype(np.float64)  # imagebind_melspec computes in float64
    fb = kaldi_fbank(x - x.mean(), window_type="hanning").T  # (128, 198)
    np.testing.assert_allclose(got[0, :, :198], (fb - IMAGEBIND_MEAN) / IMAGEBIND_STD, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        got[0, :, 198:], (0 - IMAGEBIND_MEAN) / IMAGEBIND_STD, rtol=1e-6
    )  # 6 padded frames


def test_melspec_crops_and_pads() -> None:
    assert imagebind_melspec(_sine(440, 16000, 3.0)).shape == (1, 128, 204)
    short = imagebind_melspec(_sine(440, 16000, 0.5))  # 48 frames
    pad = -IMAGEBIND_MEAN / IMAGEBIND_STD  # 0.46706
    np.testing.assert_allclose(short[0, :, 48:], pad, rtol=1e-6)
    assert not np.allclose(short[0, :, 47], pad)
    np.testing.assert_allclose(imagebind_melspec(np.zeros(100, dtype=np.float32)), pad, rtol=1e-6)


def test_imagebind_audio_end_to_end() -> None:
    x = _sine(523.0, 44100, 10.0)
    got = imagebind_audio(x, 44100)
    assert got.shape == (3, 1, 128, 204) and got.dtype == np.float32
    at16k = resample(x, 44100, dtype=np.float64)
    for k, part in enumerate(clips(at16k, 16000)):  # 10 s: the clips do not overlap
        np.testing.assert_allclose(got[k], imagebind_melspec(part), atol=1e-5)
    np.testing.assert_array_equal(x, _sine(523.0, 44100, 10.0))  # the input is left alone


def test_imagebind_audio_mean_subtraction_carries_into_overlapping_clips() -> None:
    x = _sine(300.0, 16000, 3.0) + np.float32(0.2)  # 3 s: clips [0, 2), [1/3, 7/3) ... overlap
    got = imagebind_audio(x, 16000, last_clip_at_end=True)  # starts 0, 0.5, 1.0 s
    work = x.astype(np.float64)
    want = []
    for start, end in clip_bounds(len(x), 16000, last_clip_at_end=True):
        work[start:end] -= work[start:end].mean()
        want.append(imagebind_melspec(work[start:end]))
    np.testing.assert_allclose(got, np.stack(want), atol=1e-6)
    # the second clip starts with samples the first already centred: not the same as centring it alone
    assert not np.allclose(got[1], imagebind_melspec(x[8000:40000]), atol=1e-3)
