"""Audio for the encoders: decoding, resampling, clip sampling and ImageBind's mel spectrograms.

numpy and libsndfile (through soundfile) only: no torch, torchaudio or scipy.

`decode_audio` turns the bytes a client sent (OpenAI `input_audio`: wav, mp3, flac or ogg) into
a float32 mono `Waveform`, refusing with an `InvalidArgumentError` that says what was expected
and what came: empty or non-audio bytes, other containers (AIFF, MP4/AAC, WebM ...), a declared
format that the bytes contradict, corrupt or truncated files, sample rates or channel counts out
of range, audio longer than the limit or shorter than one 25 ms analysis frame, and silence.
Silence (every sample within one 16-bit step, 2**-15, of the others; all zeros included) is
refused although ImageBind would embed it: its fbank is the log(eps) floor everywhere and the
embedding says nothing about the request.

`imagebind_audio` reproduces ImageBind's `data.py::load_and_transform_audio_data` as NExT-GPT
(legacy) and PandaGPT call it (SEEDS_SPEC 2.A and 3): resample to 16 kHz (`resample`, the same
windowed-sinc filter as torchaudio.functional.resample), cut 3 clips of 2 s
(`clip_timepoints`), and per clip subtract the mean over all channels (in place, so
overlapping clips see it), take channel 0's Kaldi fbank (128 mel bins, 25 ms Hanning window,
10 ms shift, dither 0; `_fbank.kaldi_fbank`), transpose, pad with zeros or crop to 204 frames
and normalise with mean -4.268, std 9.138 -> float32 (3, 1, 128, 204). It computes in float64:
ImageBind's float32 torchaudio moves weak bins by up to ~1.5e-4 after normalisation, and the
parity fixtures (tests/unit/parity/test_{pandagpt,nextgpt}_preprocess.py) hold this to the
seed's code run in float64 within 1e-6. Clip starts follow pytorchvideo 0.1.5 (what NExT-GPT
pins) unless `last_clip_at_end=True` asks for the later rule (the git pytorchvideo PandaGPT's
video loader needs, and ImageBind's own requirements pin); see `clip_timepoints`.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import numpy as np
import soundfile as sf
from numpy.lib.stride_tricks import sliding_window_view

from services.common.errors import InvalidArgumentError, PayloadTooLargeError
from services.models.media._fbank import kaldi_fbank

SUPPORTED_FORMATS: tuple[str, ...] = ("wav", "mp3", "flac", "ogg")  # OpenAI input_audio.format values
TARGET_RATE = 16000  # ImageBind's sample_rate
MIN_SECONDS = 0.025  # one fbank frame (400 samples at 16 kHz); ImageBind divides by zero below it
_FRAME = 400  # samples in MIN_SECONDS at TARGET_RATE
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 192000
MAX_CHANNELS = 64
SILENCE = 2.0**-15  # one step of 16-bit PCM
# ImageBind data.py: load_and_transform_audio_data defaults and waveform2melspec's fbank call.
IMAGEBIND_MEAN, IMAGEBIND_STD = -4.268, 9.138
IMAGEBIND_MEL_BINS, IMAGEBIND_FRAMES = 128, 204
_BLOCK_FRAMES = 1 << 16  # decode in blocks, down-mixing as we go: memory ~ mono output only


@dataclass(frozen=True)
class AudioLimits:
    """What `decode_audio` accepts: compressed size and duration."""

    max_bytes: int = 20 * 1024 * 1024
    max_seconds: float = 300.0


@dataclass(frozen=True, eq=False)
class Waveform:
    """Decoded mono audio: float32 samples (N,) in [-1, 1] at `sample_rate` Hz.

    `channel_mean` is the average of all channels (N,), kept beside channel 0 by
    `decode_audio(mix="first_and_mean")` for a file of several channels (None otherwise): ImageBind
    reads channel 0 but subtracts the mean over all channels (see `imagebind_audio`).
    """

    samples: np.ndarray
    sample_rate: int
    channel_mean: np.ndarray | None = None

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


def _sniff_plain(d: bytes) -> str | None:
    if d[:4] in (b"RIFF", b"RIFX", b"RF64", b"BW64") and d[8:12] == b"WAVE":
        return "wav"
    if d[:4] == b"fLaC":
        return "flac"
    if d[:4] == b"OggS":
        return "ogg"
    if len(d) >= 2 and d[0] == 0xFF and d[1] & 0xE0 == 0xE0:  # MPEG frame sync
        return "mp3" if d[1] & 0x06 else "aac"  # layer bits 00: an ADTS (AAC) header
    if d[:4] == b"FORM" and d[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    others = {b"caff": "caf", b".snd": "au", b"\x1aE\xdf\xa3": "webm", b"#!AM": "amr", b"RIFF": "riff"}
    if d[4:8] == b"ftyp":
        return "mp4"
    return others.get(d[:4])


def sniff_audio(data: bytes) -> str | None:
    """The container the bytes start with: a SUPPORTED_FORMATS name, another known one, or None.

    An ID3v2 tag is skipped and what follows it decides (a FLAC file may carry one); a tag
    followed by nothing recognisable counts as mp3, which is what carries ID3 tags.
    """
    if data[:3] == b"ID3" and len(data) >= 10:
        size = 10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(data[6:10]))
        size += 10 if data[5] & 0x10 else 0  # footer present
        return _sniff_plain(data[size : size + 16]) or "mp3"
    return _sniff_plain(data[:16])


def _expected() -> str:
    return f"the bytes of a {', '.join(SUPPORTED_FORMATS[:-1])} or {SUPPORTED_FORMATS[-1]} file"


def _corrupt(fmt: str, data: bytes, why: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"corrupt or truncated audio: expected a complete {fmt} file, got {len(data)} bytes "
        f"that fail to decode: {why}"
    )


def _check_format(data: bytes, fmt_hint: str | None) -> str:
    hint = fmt_hint.strip().lower().lstrip(".") if fmt_hint is not None else None
    if hint is not None and hint not in SUPPORTED_FORMATS:
        raise InvalidArgumentError(
            f"audio format: expected one of {', '.join(SUPPORTED_FORMATS)}, got {fmt_hint!r}"
        )
    fmt = sniff_audio(data)
    if fmt is None:
        raise InvalidArgumentError(
            f"not audio: expected {_expected()}, got {len(data)} bytes starting with {data[:16].hex(' ')}"
        )
    if fmt not in SUPPORTED_FORMATS:
        raise InvalidArgumentError(
            f"unsupported audio format: expected one of {', '.join(SUPPORTED_FORMATS)}, got {fmt}"
        )
    if hint is not None and hint != fmt:
        raise InvalidArgumentError(
            f"audio format mismatch: declared {hint!r}, expected {hint} bytes, got a {fmt} file"
        )
    return fmt


def _wav_shortfall(data: bytes) -> str | None:
    """Why a RIFF WAV is cut short (libsndfile reads what is there and says nothing), if it is."""
    if data[:4] not in (b"RIFF", b"RIFX"):  # RF64 keeps its sizes in a ds64 chunk
        return None
    order: Literal["little", "big"] = "little" if data[:4] == b"RIFF" else "big"
    pos = 12
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4 : pos + 8], order)
        if data[pos : pos + 4] == b"data":
            present = len(data) - pos - 8
            # 0 and 0xFFFFFFFF are what streaming writers put when the length is not known.
            if size not in (0, 0xFFFFFFFF) and size > present:
                return f"its data chunk declares {size} bytes, {present} are present"
            return None
        pos += 8 + size + (size & 1)
    return None


def _read_mono(
    data: bytes, fmt: str, limits: AudioLimits, mix: str
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Decode block by block into float32 mono (and the channel mean for "first_and_mean"),
    stopping as soon as the duration limit is passed."""
    blocks: list[np.ndarray] = []
    means: list[np.ndarray] = []
    total = 0
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, channels, declared = int(f.samplerate), int(f.channels), int(f.frames)
            if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
                raise InvalidArgumentError(
                    f"audio sample rate: expected {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz, got {rate} Hz"
                )
            if channels > MAX_CHANNELS:
                raise InvalidArgumentError(f"audio channels: expected at most {MAX_CHANNELS}, got {channels}")
            max_frames = math.floor(limits.max_seconds * rate)
            while total <= max_frames:
                block = f.read(min(_BLOCK_FRAMES, max_frames + 1 - total), dtype="float32", always_2d=True)
                if len(block) == 0:
                    break
                blocks.append(block.mean(axis=1) if mix == "mean" else block[:, 0])  # (n,)
                if mix == "first_and_mean" and channels > 1:
                    means.append(block.mean(axis=1))  # (n,)
                total += len(block)
    except InvalidArgumentError:
        raise
    except Exception as e:  # soundfile.LibsndfileError and whatever a damaged stream raises
        raise _corrupt(fmt, data, str(e) or type(e).__name__) from None
    if total > max_frames:
        got = f"{declared / rate:.3f} s" if declared > max_frames else f"more than {limits.max_seconds} s"
        raise InvalidArgumentError(f"audio too long: expected at most {limits.max_seconds} s, got {got}")
    samples = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)
    mean = np.concatenate(means).astype(np.float32, copy=False) if means else None
    return samples.astype(np.float32, copy=False), mean, rate


def decode_audio(
    data: bytes,
    *,
    fmt_hint: str | None,
    limits: AudioLimits,
    mix: Literal["mean", "first", "first_and_mean"] = "mean",
) -> Waveform:
    """Decode a wav, mp3, flac or ogg (Vorbis or Opus) file into float32 mono, refusing bad input.

    Args:
        data: The file's bytes; the container is sniffed from its first bytes.
        fmt_hint: The declared format (OpenAI `input_audio.format`: "wav", "mp3", "flac" or
            "ogg", any case), or None to go by the bytes alone.
        limits: Largest size in bytes and duration in seconds.
        mix: "mean" averages the channels; "first" keeps channel 0, which is what ImageBind
            ends up using (torchaudio's kaldi.fbank takes channel 0 of a multi-channel clip);
            "first_and_mean" keeps channel 0 as `samples` and the channels' average as
            `channel_mean` (files of one channel: None), what `imagebind_audio` needs.

    Returns:
        The samples, float32 (N,) scaled to [-1, 1] (integer PCM / 32768 for 16-bit, as
        torchaudio.load), at the file's own sample rate.

    Raises:
        PayloadTooLargeError: More than `limits.max_bytes` bytes.
        InvalidArgumentError: Empty, not audio, an unsupported or mismatched format, corrupt
            or truncated, sample rate or channels out of range, too long, shorter than
            MIN_SECONDS (less than one 400-sample frame once resampled to 16 kHz), or silent.
    """
    if mix not in ("mean", "first", "first_and_mean"):
        raise ValueError(f"mix: expected 'mean', 'first' or 'first_and_mean', got {mix!r}")
    if not data:
        raise InvalidArgumentError(f"empty audio: expected {_expected()}, got 0 bytes")
    if len(data) > limits.max_bytes:
        raise PayloadTooLargeError(
            f"audio too large: expected at most {limits.max_bytes} bytes, got {len(data)}"
        )
    fmt = _check_format(data, fmt_hint)
    if fmt == "wav" and (why := _wav_shortfall(data)) is not None:
        raise _corrupt(fmt, data, why)
    samples, channel_mean, rate = _read_mono(data, fmt, limits, mix)
    if len(samples) == 0:
        raise InvalidArgumentError(f"empty audio: expected at least one sample, got a {fmt} file with none")
    if -(-len(samples) * TARGET_RATE // rate) < _FRAME:  # not one frame once at 16 kHz
        raise InvalidArgumentError(
            f"audio too short: expected at least {MIN_SECONDS} s (one 25 ms analysis frame), "
            f"got {len(samples) / rate:.4f} s ({len(samples)} samples at {rate} Hz)"
        )
    if float(samples.max()) - float(samples.min()) < SILENCE:
        raise InvalidArgumentError(
            f"audio is silent: expected some sound, got {len(samples) / rate:.3f} s in which no "
            f"sample differs from the others by one 16-bit step (2**-15) or more"
        )
    return Waveform(samples, rate, channel_mean)


def _sinc_taps(
    orig: int, new: int, width: int, rolloff: float, dtype: type[np.floating] = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """Per output phase p < new: the first input tap (int64 (new,)) and its weights ((new, K), `dtype`)."""
    base = min(orig, new) * rolloff  # cut-off, in cycles per `orig` input samples / 2
    half = width * orig / base  # the filter's half-length in input samples
    phase = np.arange(new)
    first = np.ceil(phase * orig / new - half).astype(np.int64)  # (new,)
    taps = first[:, None] + np.arange(math.floor(2 * half) + 2)  # (new, K) input indices
    t = base * (taps / orig - phase[:, None] / new)  # distance in filter zero crossings
    t = np.clip(t, -width, width)
    window = np.cos(t * math.pi / width / 2) ** 2  # Hann, as torchaudio's sinc_interp_hann
    return first, (np.sinc(t) * window * (base / orig)).astype(dtype)


def resample(
    samples: np.ndarray,
    from_rate: int,
    to_rate: int = TARGET_RATE,
    *,
    lowpass_filter_width: int = 6,
    rolloff: float = 0.99,
    dtype: type[np.floating] = np.float32,
) -> np.ndarray:
    """Band-limited resampling with torchaudio.functional.resample's filter (sinc_interp_hann).

    y[j] = sum_i x[i] * s * sinc(s * orig * (i / orig - j / new)) * hann, with s = rolloff *
    min(orig, new) / orig after dividing both rates by their gcd, over the taps where the
    argument is within `lowpass_filter_width` zero crossings; the signal is zero outside.
    Only the non-zero taps of each output phase are computed (torchaudio convolves with the
    whole block, which for coprime rates such as 44101 -> 16000 would need gigabytes).

    Args:
        samples: float (N,).
        from_rate, to_rate: Integer rates in Hz.
        lowpass_filter_width: Zero crossings on each side of the sinc.
        rolloff: Cut-off as a fraction of the lower Nyquist frequency.
        dtype: Precision of the work and the result (the filter is computed in float64 and
            rounded to it once): float32, or float64 for `imagebind_audio`.

    Returns:
        (ceil(N * to_rate / from_rate),) of `dtype`.
    """
    x = np.asarray(samples, dtype=dtype)
    if x.ndim != 1 or from_rate <= 0 or to_rate <= 0:
        raise ValueError(
            f"resample: expected (N,) samples and positive rates, got {x.shape}, {from_rate}, {to_rate}"
        )
    if from_rate == to_rate:
        return x
    g = math.gcd(int(from_rate), int(to_rate))
    orig, new = int(from_rate) // g, int(to_rate) // g
    first, weights = _sinc_taps(orig, new, lowpass_filter_width, rolloff, dtype)  # (new,), (new, K)
    n_out = -(-new * len(x) // orig)  # ceil, in integers
    blocks = -(-n_out // new)
    left = max(0, -int(first.min()))
    size = max(left + len(x), left + (blocks - 1) * orig + int(first.max()) + weights.shape[1])
    padded = np.zeros(size, dtype=dtype)
    padded[left : left + len(x)] = x
    windows = sliding_window_view(padded, weights.shape[1])  # (size - K + 1, K), a view
    out = np.empty(blocks * new, dtype=dtype)
    step = max(1, (1 << 20) // weights.size)  # blocks per chunk: ~4 MB of gathered taps
    for k0 in range(0, blocks, step):
        k = np.arange(k0, min(blocks, k0 + step))
        rows = k[:, None] * orig + (first + left)[None, :]  # (nk, new)
        out[k0 * new : (k0 + len(k)) * new] = np.einsum("kpq,pq->kp", windows[rows], weights).ravel()
    return out[:n_out]


def clip_timepoints(
    duration: float, *, clip_seconds: float = 2.0, num_clips: int = 3, last_clip_at_end: bool = False
) -> list[tuple[Fraction, Fraction]]:
    """(start, end) seconds of pytorchvideo's ConstantClipsPerVideoSampler, exactly (Fractions).

    Always `num_clips` clips of `clip_seconds`: start_k = k * max(duration - clip, 0) / d for
    k = 0 .. num_clips - 1, end_k = start_k + clip. The divisor d depends on pytorchvideo's
    version: d = num_clips in pytorchvideo 0.1.5 from PyPI, which NExT-GPT pins (the last 1/num_clips of the audio is never the start of a clip); d =
    max(num_clips - 1, 1) from git commit 9368f30 on (ImageBind's requirements pin a commit
    after it, and PandaGPT's video loader needs one: PyPI 0.1.5 refuses its `sample_rate`
    argument), so the last clip ends at the end (`last_clip_at_end=True`). Audio shorter than a
    clip gives num_clips copies of [0, clip_seconds).
    """
    if num_clips < 1 or clip_seconds <= 0:
        raise ValueError(
            f"clips: expected num_clips >= 1 and clip_seconds > 0, got {num_clips}, {clip_seconds}"
        )
    clip = Fraction(clip_seconds)
    max_start = Fraction(max(duration - float(clip), 0))  # float arithmetic first, as pytorchvideo
    step = max_start / (max(num_clips - 1, 1) if last_clip_at_end else num_clips)
    return [(step * k, step * k + clip) for k in range(num_clips)]


def clip_bounds(
    num_samples: int,
    sample_rate: int,
    *,
    clip_seconds: float = 2.0,
    num_clips: int = 3,
    last_clip_at_end: bool = False,
) -> list[tuple[int, int]]:
    """Sample ranges of `clip_timepoints` as ImageBind slices them: [int(start * rate), int(end * rate)).

    The duration is `num_samples / sample_rate` (a float, as ImageBind computes it). Ends past
    the audio are cut to `num_samples`, so short audio gives shorter clips, which
    `imagebind_melspec` pads after the fbank.
    """
    points = clip_timepoints(
        num_samples / sample_rate,
        clip_seconds=clip_seconds,
        num_clips=num_clips,
        last_clip_at_end=last_clip_at_end,
    )
    return [(int(s * sample_rate), min(num_samples, int(e * sample_rate))) for s, e in points]


def clips(
    samples: np.ndarray,
    rate: int,
    *,
    clip_seconds: float = 2.0,
    num_clips: int = 3,
    last_clip_at_end: bool = False,
) -> list[np.ndarray]:
    """The clips of `clip_bounds`, as copies: (n_k,) each, n_k <= clip_seconds * rate, float32
    or float64 as the samples (others become float32)."""
    bounds = clip_bounds(
        len(samples), rate, clip_seconds=clip_seconds, num_clips=num_clips, last_clip_at_end=last_clip_at_end
    )
    dtype = np.float64 if np.asarray(samples).dtype == np.float64 else np.float32
    return [np.array(samples[s:e], dtype=dtype) for s, e in bounds]


def imagebind_melspec(
    clip: np.ndarray,
    sample_rate: int = TARGET_RATE,
    *,
    num_mel_bins: int = IMAGEBIND_MEL_BINS,
    target_length: int = IMAGEBIND_FRAMES,
    mean: float = IMAGEBIND_MEAN,
    std: float = IMAGEBIND_STD,
) -> np.ndarray:
    """ImageBind's `waveform2melspec` + `Normalize` for one clip: float32 (1, num_mel_bins, target_length).

    Subtract the clip's mean, Kaldi fbank (Hanning window, 25 ms / 10 ms, dither 0), transpose
    to (bins, frames), zero-pad on the right or crop to `target_length` frames (a full 2 s clip
    has 198 frames, so 6 frames of padding), then (x - mean) / std, padding included. A clip
    shorter than one frame gives padding only (ImageBind would divide by zero). Computed in
    float64 (see `imagebind_audio`).
    """
    x = np.asarray(clip, dtype=np.float64)
    x = x - x.mean() if len(x) else x
    return _melspec(x, sample_rate, num_mel_bins, target_length, mean, std)


def _melspec(
    centred: np.ndarray, sample_rate: int, num_mel_bins: int, target_length: int, mean: float, std: float
) -> np.ndarray:
    fbank = kaldi_fbank(centred, float(sample_rate), num_mel_bins, 25.0, 10.0, window_type="hanning").T
    out = np.zeros((num_mel_bins, target_length), dtype=np.float64)  # (bins, T)
    frames = min(target_length, fbank.shape[1])
    out[:, :frames] = fbank[:, :frames]
    return ((out - mean) / std).astype(np.float32)[None]  # (1, bins, T)


def imagebind_audio(
    samples: np.ndarray,
    sample_rate: int,
    *,
    channel_mean: np.ndarray | None = None,
    clip_seconds: float = 2.0,
    num_clips: int = 3,
    last_clip_at_end: bool = False,
) -> np.ndarray:
    """ImageBind's `load_and_transform_audio_data` after loading: float32 (num_clips, 1, 128, 204).

    Resample to 16 kHz, cut the clips of `clip_bounds`, `imagebind_melspec` each. As in
    ImageBind, each clip's mean is subtracted in place in the shared waveform before the next
    clip is cut (`waveform -= waveform.mean()` on a tensor view), so overlapping clips (audio
    under clip_seconds * num_clips) see the earlier clips' offsets in the frames that straddle
    a clip boundary. ImageBind's mean is over all channels of the clip while its fbank reads
    channel 0: pass the channels' average as `channel_mean` (`decode_audio(mix="first_and_mean")`)
    for a file of several channels.

    The work is float64 (kernel, resampling, fbank, normalisation), rounded to float32 at the
    end. ImageBind runs in float32, whose rounding moves its own log-mel values by up to ~1e-3
    in weak bins; the parity fixture holds both its float32 output and the same code run in
    float64, which this reproduces to ~1e-6 (tests/unit/parity/test_*_preprocess.py).
    """
    work = resample(samples, sample_rate, TARGET_RATE, dtype=np.float64).copy()  # (N,), changed in place
    reference = work
    if channel_mean is not None:
        reference = resample(channel_mean, sample_rate, TARGET_RATE, dtype=np.float64).copy()
    bounds = clip_bounds(
        len(work),
        TARGET_RATE,
        clip_seconds=clip_seconds,
        num_clips=num_clips,
        last_clip_at_end=last_clip_at_end,
    )
    out = []
    for start, end in bounds:
        view = work[start:end]
        if len(view):
            offset = reference[start:end].mean()
            view -= offset
            if reference is not work:
                reference[start:end] -= offset
        out.append(
            _melspec(view, TARGET_RATE, IMAGEBIND_MEL_BINS, IMAGEBIND_FRAMES, IMAGEBIND_MEAN, IMAGEBIND_STD)
        )
    return np.stack(out)  # (num_clips, 1, bins, T)
