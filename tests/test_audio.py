"""Audio reading, preprocessing, spectra and waveform reconstruction."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.io import wavfile
from sklearn.decomposition import PCA

from audiomnist_anomalies.audio import (
    Recording,
    fit_length,
    frequency_axis,
    magnitude_spectrum,
    moving_average,
    preprocess,
    read_wav,
    reconstruct_signal,
    resample,
)
from audiomnist_anomalies.errors import AudioInputError
from synthetic import SAMPLE_RATE, pcm24_wav_bytes, speech_like, tone, write_wav
from wavbuild import wav_file


@pytest.mark.parametrize("frequency", [50.0, 440.0, 1234.0, 3000.0])
def test_tone_spectrum_peaks_at_frequency(tmp_path, frequency):
    path = write_wav(tmp_path / "tone.wav", tone(frequency, 0.8))
    samples = preprocess(read_wav(path), 6800, 1.0, 5)
    spectrum, maximum = magnitude_spectrum(samples)
    frequencies = frequency_axis(6800, 1.0)

    assert frequencies[np.argmax(spectrum)] == pytest.approx(frequency, abs=1.0)
    assert spectrum.max() == 1.0
    assert maximum > 0


def test_frequency_axis_spans_zero_to_nyquist():
    frequencies = frequency_axis(6800, 1.0)

    assert frequencies.shape == (3401,)
    assert frequencies[0] == 0.0
    assert frequencies[-1] == pytest.approx(3400.0)
    assert np.allclose(np.diff(frequencies), 1.0)


ENCODING_NAMES = {
    "uint8": "pcm8",
    "int16": "pcm16",
    "int32": "pcm32",
    "float32": "float32",
    "float64": "float64",
}


@pytest.mark.parametrize("dtype", ["uint8", "int16", "int32", "float32", "float64"])
def test_encodings_decode_to_same_signal(tmp_path, dtype):
    signal = tone(300, 0.2)
    recording = read_wav(write_wav(tmp_path / f"{dtype}.wav", signal, dtype=dtype))
    tolerance = 1.0 / 64 if dtype == "uint8" else 1e-4

    assert recording.sample_rate == SAMPLE_RATE
    assert recording.channels == 1
    assert recording.encoding == ENCODING_NAMES[dtype]
    assert np.max(np.abs(recording.samples - signal)) < tolerance


def test_24_bit_pcm_decodes(tmp_path):
    signal = tone(300, 0.1)
    path = tmp_path / "pcm24.wav"
    path.write_bytes(pcm24_wav_bytes(signal))
    recording = read_wav(path)

    assert recording.samples.shape == signal.shape
    assert np.max(np.abs(recording.samples - signal)) < 1e-6


def test_stereo_is_downmixed(tmp_path):
    left, right = tone(200, 0.1, amplitude=0.4), tone(200, 0.1, amplitude=0.2)
    path = tmp_path / "stereo.wav"
    wavfile.write(path, SAMPLE_RATE, np.stack([left, right], axis=1).astype(np.float32))
    recording = read_wav(path)

    assert recording.channels == 2
    assert np.allclose(recording.samples, (left + right) / 2, atol=1e-6)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a WAV file"),
        (b"this is a text file, not audio\n" * 10, "not a WAV file"),
        (bytes(range(256)) * 4, "not a WAV file"),
    ],
)
def test_non_wav_files_raise_input_error(tmp_path, content, message):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)

    with pytest.raises(AudioInputError, match=message):
        read_wav(path)


def test_nan_samples_are_rejected(tmp_path):
    signal = tone(200, 0.1).astype(np.float32)
    signal[10] = np.nan
    path = tmp_path / "nan.wav"
    wavfile.write(path, SAMPLE_RATE, signal)

    with pytest.raises(AudioInputError, match="NaN or infinite"):
        read_wav(path)


def test_header_without_samples_is_rejected(tmp_path):
    path = write_wav(tmp_path / "empty.wav", np.zeros(0))

    with pytest.raises(AudioInputError, match="no samples"):
        read_wav(path)


def test_silent_recording_has_no_spectrum():
    with pytest.raises(AudioInputError, match="silent"):
        magnitude_spectrum(np.zeros(6800))


def test_resample_and_fit_length():
    samples = tone(100, 0.5)
    resampled = resample(samples, SAMPLE_RATE, 6800)

    assert resampled.shape == (3400,)
    assert fit_length(resampled, 6800).shape == (6800,)
    assert np.all(fit_length(resampled, 6800)[3400:] == 0)
    assert np.array_equal(fit_length(resampled, 100), resampled[:100])


def test_moving_average_keeps_length_and_mean():
    samples = np.r_[np.zeros(10), np.ones(10), np.zeros(10)]
    smoothed = moving_average(samples, 5)

    assert smoothed.shape == samples.shape
    assert smoothed[15] == pytest.approx(1.0)
    assert smoothed[10] == pytest.approx(0.6)
    assert np.array_equal(moving_average(samples, 1), samples)


def test_full_pca_reconstruction_returns_input_signal(tmp_path):
    rng = np.random.default_rng(3)
    signals = [
        preprocess(read_wav(write_wav(tmp_path / f"{i}.wav", speech_like(rng, 0.6))), 6800, 1.0, 5)
        for i in range(12)
    ]
    spectra, maxima = zip(*(magnitude_spectrum(signal) for signal in signals))
    matrix = np.vstack(spectra)
    pca = PCA(n_components=matrix.shape[0], svd_solver="full").fit(matrix)
    reconstructed = pca.inverse_transform(pca.transform(matrix))

    for index, signal in enumerate(signals):
        waveform = reconstruct_signal(signal, reconstructed[index], maxima[index])
        assert np.max(np.abs(waveform - signal)) < 1e-6 * np.max(np.abs(signal)) + 1e-9


def test_opposite_channels_are_named(tmp_path):
    left = tone(200, 0.1, amplitude=0.4)
    path = tmp_path / "inverted.wav"
    wavfile.write(path, SAMPLE_RATE, np.stack([left, -left], axis=1).astype(np.float32))

    with pytest.raises(AudioInputError, match="channels cancel out"):
        read_wav(path)


@pytest.mark.parametrize("source_rate, target_rate", [(48000, 6800), (48000, 16000), (44100, 16000)])
def test_resampling_keeps_the_pass_band_and_stops_aliases(source_rate, target_rate):
    nyquist = target_rate / 2
    time = np.arange(source_rate) / source_rate

    def level_db(frequency):
        resampled = resample(np.sin(2 * np.pi * frequency * time), source_rate, target_rate)
        steady = resampled[target_rate // 10 : -target_rate // 10]
        return 20 * np.log10(np.sqrt(2) * np.std(steady) + 1e-30)

    assert abs(level_db(0.5 * nyquist)) < 0.01
    assert abs(level_db(0.9 * nyquist)) < 0.01
    # Above the new Nyquist frequency a tone would alias to a false one below it.
    assert level_db(1.05 * nyquist) < -100


def test_resampling_is_deterministic_and_keeps_length():
    samples = np.random.default_rng(4).standard_normal(48000)

    first = resample(samples, 48000, 16000)

    assert first.shape == (16000,)
    assert np.array_equal(first, resample(samples.copy(), 48000, 16000))
    assert np.array_equal(resample(samples, 48000, 48000), samples)


@pytest.mark.parametrize("source_rate, target_rate", [(48000, 16000), (48000, 6800), (44100, 16000), (8000, 16000)])
def test_float32_resampling_equals_float64(source_rate, target_rate):
    # resample hands soxr float32 samples because soxr's HQ filter computes in
    # single precision anyway, so the output must not change.
    import soxr

    samples = np.random.default_rng(5).standard_normal(30000) * 0.3
    direct = soxr.resample(samples, source_rate, target_rate, quality="HQ")

    assert direct.dtype == np.float64
    assert np.array_equal(resample(samples, source_rate, target_rate), direct)


@pytest.mark.parametrize("rate", [1, 800, 3999])
def test_speech_needs_4000_hz(tmp_path, rate):
    path = write_wav(tmp_path / "low.wav", np.sin(np.arange(4 * rate) * 0.3), sample_rate=rate)

    with pytest.raises(AudioInputError, match=f"sample rate {rate} Hz is below 4000 Hz"):
        read_wav(path)


@pytest.mark.parametrize("source_rate, target_rate", [(48000, 16000), (48000, 6800), (44100, 16000), (8000, 16000)])
def test_long_recording_resamples_only_kept_start(source_rate, target_rate):
    samples = np.random.default_rng(3).standard_normal(int(source_rate * 7.3))
    recording = Recording(samples, source_rate, 1, "pcm16")
    whole = moving_average(fit_length(resample(samples, source_rate, target_rate), target_rate), 5)

    # Trimming before resampling keeps the window as if the whole file were resampled.
    kept = preprocess(recording, target_rate, 1.0, 5)
    assert np.max(np.abs(kept - whole)) <= 1e-9 * np.max(np.abs(whole))


def test_short_recording_keeps_the_filter_decay_after_its_end():
    # A click on the last sample: most of its filtered energy lies after the
    # end of the recording, inside the silence that pads the window.
    samples = np.zeros(24000)
    samples[-1] = 1.0
    recording = Recording(samples, 48000, 1, "pcm16")
    reference = fit_length(resample(np.pad(samples, (0, 48000)), 48000, 6800), 6800)

    kept = preprocess(recording, 6800, 1.0, 1)

    assert np.sum(kept**2) == pytest.approx(np.sum(reference**2), rel=1e-6)
    assert np.max(np.abs(kept - reference)) < 1e-6 * np.max(np.abs(reference))


@pytest.mark.parametrize("rate, accepted", [(384000, True), (768000, True), (768001, False), (10**9, False)])
def test_sample_rate_above_768_khz_is_a_damaged_header(tmp_path, rate, accepted):
    path = tmp_path / "fast.wav"
    path.write_bytes(wav_file(np.zeros(100, "<i2").tobytes() + b"\x01\x00", sample_rate=rate))

    if accepted:
        assert read_wav(path).sample_rate == rate
    else:
        with pytest.raises(AudioInputError, match=f"sample rate {rate} Hz is above 768000 Hz"):
            read_wav(path)
