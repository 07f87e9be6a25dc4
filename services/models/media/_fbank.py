"""Kaldi-compatible log-mel filter banks in numpy (torchaudio.compliance.kaldi.fbank, no torch).

`kaldi_fbank` follows torchaudio's `compliance.kaldi.fbank` step by step, for the options that
ImageBind (and so NExT-GPT and PandaGPT) use, with Kaldi's defaults for the rest:

    frames      window_size = int(rate * frame_length_ms * 0.001), shift likewise;
                snip_edges: m = 1 + (N - window_size) // shift frames, none if N < window_size
    dither      0 (none; ImageBind passes dither=0.0, and output must be deterministic)
    per frame   remove the DC offset (frame mean), pre-emphasis x[j] -= 0.97 * x[max(0, j-1)],
                window ("povey" = symmetric Hann ** 0.85 by default; ImageBind passes "hanning"),
                zero-pad to the next power of two (400 -> 512), power spectrum |rfft|^2
    mel banks   Kaldi's triangles, equally spaced on mel = 1127 ln(1 + f / 700) between low_freq
                (20 Hz) and high_freq (0 means Nyquist), num_mel_bins + 2 edge points; the
                Nyquist FFT bin gets weight 0
    log         log(max(energy, eps)) with eps = float32 machine epsilon (2 ** -23)

Fixed as torchaudio's defaults and not offered: use_energy=False (so htk_compat, which only
moves the energy column, has no effect), raw_energy, use_power=True, use_log_fbank=True,
subtract_mean=False, no VTLN. The work is done in float64 and returned as float32; the unit
tests compare it with a loop-per-frame transcription of the same formulas.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# torch.finfo(torch.float).eps, the floor torchaudio puts under the mel energies before the log.
EPSILON = float(np.finfo(np.float32).eps)
WINDOW_TYPES: tuple[str, ...] = ("povey", "hanning", "hamming", "rectangular", "blackman")


def mel_scale(freq: np.ndarray | float) -> np.ndarray:
    """Kaldi's mel scale: 1127 ln(1 + f / 700)."""
    return 1127.0 * np.log(1.0 + np.asarray(freq, dtype=np.float64) / 700.0)


def feature_window(window_type: str, size: int, *, blackman_coeff: float = 0.42) -> np.ndarray:
    """The analysis window Kaldi names `window_type`, float64 (size,), symmetric (not periodic)."""
    n = np.arange(size, dtype=np.float64)
    a = 2.0 * math.pi / (size - 1)
    if window_type in ("hanning", "povey"):
        hann = 0.5 - 0.5 * np.cos(a * n)  # torch.hann_window(size, periodic=False)
        return hann if window_type == "hanning" else hann**0.85
    if window_type == "hamming":
        return 0.54 - 0.46 * np.cos(a * n)
    if window_type == "rectangular":
        return np.ones(size)
    if window_type == "blackman":
        return blackman_coeff - 0.5 * np.cos(a * n) + (0.5 - blackman_coeff) * np.cos(2 * a * n)
    raise ValueError(f"window_type: expected one of {', '.join(WINDOW_TYPES)}, got {window_type!r}")


def mel_banks(
    num_bins: int, padded_window_size: int, sample_rate: float, low_freq: float, high_freq: float
) -> np.ndarray:
    """Kaldi's triangular mel filters over the FFT bins 0 .. padded/2 - 1: float64 (num_bins, padded/2).

    As torchaudio's `get_mel_banks` without VTLN; a `high_freq` <= 0 counts down from Nyquist.
    """
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if num_bins <= 3:
        raise ValueError(f"num_mel_bins: expected more than 3, got {num_bins}")
    if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
        raise ValueError(
            f"mel banks: expected 0 <= low_freq < high_freq <= Nyquist ({nyquist} Hz), "
            f"got low_freq={low_freq}, high_freq={high_freq}"
        )
    mel_low, mel_high = float(mel_scale(low_freq)), float(mel_scale(high_freq))
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = np.arange(num_bins, dtype=np.float64)[:, None]  # (bins, 1)
    left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    mel = mel_scale(sample_rate / padded_window_size * np.arange(padded_window_size // 2))[None, :]
    up = (mel - left) / (center - left)  # (bins, fft_bins)
    down = (right - mel) / (right - center)
    return np.maximum(0.0, np.minimum(up, down))


def frame_count(num_samples: int, window_size: int = 400, window_shift: int = 160) -> int:
    """Frames Kaldi takes with snip_edges=True: 1 + (N - size) // shift, or 0 when N < size."""
    return 0 if num_samples < window_size else 1 + (num_samples - window_size) // window_shift


def kaldi_fbank(
    waveform: np.ndarray,
    sample_rate: float = 16000.0,
    num_mel_bins: int = 128,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    *,
    window_type: str = "povey",
    preemphasis_coefficient: float = 0.97,
    remove_dc_offset: bool = True,
    round_to_power_of_two: bool = True,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    blackman_coeff: float = 0.42,
) -> np.ndarray:
    """Log-mel filter bank features of a mono waveform, as torchaudio.compliance.kaldi.fbank.

    Args:
        waveform: Samples, (N,), at `sample_rate`; any float or int dtype (not rescaled).
        sample_rate: Hz.
        num_mel_bins: Mel filters (torchaudio's default is 23; ImageBind uses 128).
        frame_length_ms: Window length; 25 ms is 400 samples at 16 kHz.
        frame_shift_ms: Hop; 10 ms is 160 samples at 16 kHz.
        window_type: "povey" (Kaldi's default), "hanning" (ImageBind), "hamming", "rectangular"
            or "blackman".
        preemphasis_coefficient: 0 turns pre-emphasis off.
        remove_dc_offset: Subtract each frame's mean first.
        round_to_power_of_two: Zero-pad each frame to the next power of two before the FFT.
        low_freq: Lower edge of the first mel filter, Hz.
        high_freq: Upper edge of the last one, Hz; <= 0 is an offset from Nyquist.
        blackman_coeff: Only for window_type "blackman".

    Returns:
        float32 (frames, num_mel_bins), frames = 1 + (N - window) // shift (0 when N < window).

    Raises:
        ValueError: A waveform that is not 1-D, or options Kaldi would refuse.
    """
    x = np.asarray(waveform)
    if x.ndim != 1:
        raise ValueError(f"kaldi_fbank waveform: expected shape (N,), got {x.shape}")
    # The same float expressions as torchaudio, so that the sizes round the same way.
    window_shift = int(sample_rate * frame_shift_ms * 0.001)
    window_size = int(sample_rate * frame_length_ms * 0.001)
    if window_size < 2 or window_shift < 1:
        raise ValueError(
            f"kaldi_fbank frames: expected a window of >= 2 samples and a shift of >= 1, "
            f"got {window_size} and {window_shift}"
        )
    padded = 1 << (window_size - 1).bit_length() if round_to_power_of_two else window_size
    banks = mel_banks(num_mel_bins, padded, sample_rate, low_freq, high_freq)  # (bins, padded/2)
    m = frame_count(len(x), window_size, window_shift)
    if m == 0:
        return np.zeros((0, num_mel_bins), dtype=np.float32)
    frames = sliding_window_view(x, window_size)[::window_shift].astype(np.float64)  # (m, W)
    if remove_dc_offset:
        frames = frames - frames.mean(axis=1, keepdims=True)
    if preemphasis_coefficient != 0.0:
        previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)  # x[max(0, j-1)]
        frames = frames - preemphasis_coefficient * previous
    frames = frames * feature_window(window_type, window_size, blackman_coeff=blackman_coeff)
    spectrum = np.abs(np.fft.rfft(frames, n=padded, axis=1)) ** 2  # (m, padded/2 + 1)
    energies = spectrum[:, : padded // 2] @ banks.T  # (m, bins); the Nyquist bin has weight 0
    return np.log(np.maximum(energies, EPSILON)).astype(np.float32)
