"""Kaldi fbank: the vectorised numpy version against a loop-per-frame transcription of Kaldi's
formulas (its `MelBanks` if/else triangles, an explicit DFT), and known properties."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.models.media._fbank import EPSILON, feature_window, frame_count, kaldi_fbank, mel_banks


def _ref_fbank(
    x: np.ndarray, rate: float, bins: int, window_type: str, low: float = 20.0, high: float = 0.0
) -> np.ndarray:
    """Kaldi's ComputeFbank one frame at a time (snip_edges, no dither, no energy), in float64."""
    size, shift = int(rate * 25 * 0.001), int(rate * 10 * 0.001)
    n_fft = 1
    while n_fft < size:
        n_fft *= 2
    nyquist = rate / 2
    high = high if high > 0 else nyquist + high

    def mel(f: float) -> float:
        return 1127.0 * math.log(1.0 + f / 700.0)

    delta = (mel(high) - mel(low)) / (bins + 1)
    banks = np.zeros((bins, n_fft // 2 + 1))
    for b in range(bins):
        left, centre, right = (mel(low) + (b + k) * delta for k in range(3))
        for j in range(n_fft // 2):
            m = mel(rate / n_fft * j)
            if left < m < right:
                banks[b, j] = (m - left) / (centre - left) if m <= centre else (right - m) / (right - centre)
    hann = [0.5 - 0.5 * math.cos(2 * math.pi * i / (size - 1)) for i in range(size)]
    window = {"hanning": hann, "povey": [h**0.85 for h in hann]}[window_type]
    dft = np.exp(-2j * math.pi * np.outer(np.arange(n_fft // 2 + 1), np.arange(n_fft)) / n_fft)
    out = []
    for f in range(0 if len(x) < size else 1 + (len(x) - size) // shift):
        frame = [float(v) for v in x[f * shift : f * shift + size]]
        mean = sum(frame) / size
        frame = [v - mean for v in frame]
        for i in range(size - 1, 0, -1):  # Kaldi's Preemphasize runs backwards, in place
            frame[i] -= 0.97 * frame[i - 1]
        frame[0] -= 0.97 * frame[0]
        padded = np.zeros(n_fft)
        padded[:size] = [v * w for v, w in zip(frame, window, strict=True)]
        power = np.abs(dft @ padded) ** 2
        out.append([math.log(max(float(banks[b] @ power), EPSILON)) for b in range(bins)])
    return np.asarray(out).reshape(-1, bins)


def _sine(freq: float, n: int, rate: float = 16000.0, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(n) / rate)).astype(np.float32)


CASES = [
    ("random-128-hanning", 128, "hanning", 16000.0),
    ("random-128-povey", 128, "povey", 16000.0),
    ("random-23-povey", 23, "povey", 16000.0),
    ("random-64-hanning-8k", 64, "hanning", 8000.0),
]


@pytest.mark.parametrize(("name", "bins", "window", "rate"), CASES, ids=[c[0] for c in CASES])
def test_matches_loop_reference_on_noise(name: str, bins: int, window: str, rate: float) -> None:
    x = np.random.default_rng(len(name)).uniform(-0.5, 0.5, 4123).astype(np.float32)
    got = kaldi_fbank(x, rate, bins, window_type=window)
    want = _ref_fbank(x, rate, bins, window)
    assert got.shape == want.shape == (frame_count(4123, int(rate * 0.025), int(rate * 0.01)), bins)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("freq", [440.0, 1000.0, 3333.3, 7900.0])
def test_matches_loop_reference_on_sines(freq: float) -> None:
    x = _sine(freq, 3000) + np.float32(0.01)  # a DC offset too, which each frame removes
    np.testing.assert_allclose(
        kaldi_fbank(x, window_type="hanning"), _ref_fbank(x, 16000.0, 128, "hanning"), rtol=1e-4, atol=1e-5
    )


def test_matches_loop_reference_with_band_limits() -> None:
    x = np.random.default_rng(3).standard_normal(2000).astype(np.float32)
    got = kaldi_fbank(x, 16000.0, 40, low_freq=100.0, high_freq=-400.0)
    np.testing.assert_allclose(got, _ref_fbank(x, 16000.0, 40, "povey", 100.0, -400.0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n", [400, 401, 559, 560, 561, 16000, 32000, 32001])
def test_frame_count_with_snip_edges(n: int) -> None:
    fb = kaldi_fbank(np.random.default_rng(n).standard_normal(n))
    assert fb.shape == (1 + (n - 400) // 160, 128)


def test_shorter_than_a_frame_gives_no_frames() -> None:
    assert kaldi_fbank(np.ones(399, dtype=np.float32)).shape == (0, 128)
    assert kaldi_fbank(np.zeros(0, dtype=np.float32)).shape == (0, 128)


def test_two_seconds_give_198_frames() -> None:
    assert kaldi_fbank(_sine(440, 32000), window_type="hanning").shape == (198, 128)


def test_1khz_tone_peaks_in_the_filter_that_holds_1khz() -> None:
    fb = kaldi_fbank(_sine(1000.0, 16000), window_type="hanning")
    banks = mel_banks(128, 512, 16000.0, 20.0, 0.0)
    fft_bin = round(1000.0 / (16000 / 512))  # 1 kHz is FFT bin 32 exactly
    peak = int(np.argmax(fb.mean(axis=0)))
    assert peak == int(np.argmax(banks[:, fft_bin]))
    mel_low, mel_high = 1127.0 * math.log(1 + 20.0 / 700), 1127.0 * math.log(1 + 8000.0 / 700)
    centre = 700.0 * (math.exp((mel_low + (peak + 1) * (mel_high - mel_low) / 129) / 1127.0) - 1.0)
    assert abs(centre - 1000.0) < 40.0  # within about one filter spacing at 1 kHz (~33 Hz)


def test_scaling_the_signal_shifts_the_log_energies() -> None:
    x = np.random.default_rng(5).standard_normal(4000).astype(np.float32) * np.float32(0.1)
    live = mel_banks(128, 512, 16000.0, 20.0, 0.0).sum(axis=1) > 0  # filter 3 is empty (see below)
    np.testing.assert_allclose(
        kaldi_fbank(2 * x)[:, live], kaldi_fbank(x)[:, live] + math.log(4.0), atol=1e-4
    )


def test_silence_is_the_epsilon_floor() -> None:
    fb = kaldi_fbank(np.zeros(1000, dtype=np.float32))
    np.testing.assert_allclose(fb, math.log(EPSILON))
    np.testing.assert_allclose(kaldi_fbank(np.full(1000, 0.3, dtype=np.float32)), math.log(EPSILON))


def test_windows_match_numpys_symmetric_windows() -> None:
    np.testing.assert_allclose(feature_window("hanning", 400), np.hanning(400), atol=1e-12)
    np.testing.assert_allclose(feature_window("povey", 400), np.hanning(400) ** 0.85, atol=1e-12)
    np.testing.assert_allclose(feature_window("hamming", 400), np.hamming(400), atol=1e-12)
    np.testing.assert_allclose(feature_window("blackman", 400), np.blackman(400), atol=1e-12)
    np.testing.assert_allclose(feature_window("rectangular", 400), 1.0)
    with pytest.raises(ValueError, match="window_type: expected one of"):
        feature_window("kaiser", 400)


def test_mel_banks_are_triangles_up_to_nyquist() -> None:
    banks = mel_banks(128, 512, 16000.0, 20.0, 0.0)
    assert banks.shape == (128, 256)
    assert banks.min() >= 0.0 and banks.max() <= 1.0
    # With ImageBind's 128 filters over 512-point FFT bins (31.25 Hz apart), filter 3 (about
    # 63-93 Hz) falls between two FFT bins (62.5 and 93.75 Hz) and is empty: that row of every
    # ImageBind input is the log(eps) floor. Kaldi (and torchaudio) leave it so.
    assert np.flatnonzero(banks.sum(axis=1) == 0).tolist() == [3]
    assert (kaldi_fbank(_sine(125.0, 4000))[:, 3] == np.float32(math.log(EPSILON))).all()
    assert banks[:, 0].sum() == 0.0  # 0 Hz lies below low_freq (20 Hz)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_mel_bins": 3}, "num_mel_bins: expected more than 3"),
        ({"low_freq": 9000.0}, "expected 0 <= low_freq < high_freq"),
        ({"high_freq": 9000.0}, "expected 0 <= low_freq < high_freq"),
        ({"frame_length_ms": 0.05}, "kaldi_fbank frames"),
    ],
)
def test_bad_options_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        kaldi_fbank(np.zeros(1000, dtype=np.float32), **kwargs)


def test_waveform_must_be_1d() -> None:
    with pytest.raises(ValueError, match=r"expected shape \(N,\), got \(2, 500\)"):
        kaldi_fbank(np.zeros((2, 500), dtype=np.float32))
