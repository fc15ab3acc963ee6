"""Known defects and the measurement of the detectors against them."""

from __future__ import annotations

import numpy as np
import pytest

from audiomnist_anomalies.audio import Recording, magnitude_spectrum, preprocess
from audiomnist_anomalies.defects import (
    add_hum,
    add_noise,
    change_speed,
    clip,
    cut_off,
    dc_offset,
    high_pass,
    low_pass,
    near_silence,
    quantize_16_bit,
    reverse,
    second_voice,
)
from audiomnist_anomalies.detect import detect_anomalies
from audiomnist_anomalies.evaluate import (
    CLEAN,
    assign_defects,
    corrupt,
    detection_quality,
    evaluate_scores,
    precision_at_k,
    purity,
    flagged_type_recovery,
    type_recovery,
    rank_average,
    sampled_curves,
)
from audiomnist_anomalies.params import default_params, validate_params
from audiomnist_anomalies.outputs import write_wav
from synthetic import SAMPLE_RATE, speech_like, tone

RNG = np.random.default_rng(0)


def peak_frequency(samples, sample_rate=SAMPLE_RATE):
    spectrum = np.abs(np.fft.rfft(samples))
    return np.fft.rfftfreq(samples.size, 1 / sample_rate)[np.argmax(spectrum)]


def power(samples):
    return float(np.mean(samples**2))


def test_auc_on_hand_made_case():
    labels = np.array([1, 1, 0, 0, 0])
    scores = np.array([0.9, 0.4, 0.5, 0.1, 0.2])
    quality = detection_quality(labels, scores)

    # 5 of the 6 anomaly-clean pairs are ordered correctly.
    assert quality["roc_auc"] == pytest.approx(5 / 6, abs=1e-4)
    assert quality["average_precision"] == pytest.approx((1 + 2 / 3) / 2, abs=1e-4)
    assert quality["precision_at_k"] == 0.5
    assert quality["anomalies"] == 2


def test_precision_at_k_counts_top_scores():
    assert precision_at_k(np.array([True, False, True, False]), np.array([4, 3, 2, 1])) == 0.5


def test_rank_average_combines_ranks():
    combined = rank_average(np.array([1.0, 2.0, 3.0]), np.array([30.0, 10.0, 20.0]))

    assert combined.tolist() == pytest.approx([2 / 3, 1 / 2, 5 / 6])


def test_defects_are_spread_evenly():
    labels = assign_defects(1000, 0.05, ["noise", "hum", "reversed"], 42)
    counts = {name: labels.count(name) for name in ("noise", "hum", "reversed")}

    assert labels.count(CLEAN) == 950
    assert counts == {"noise": 17, "hum": 17, "reversed": 16}
    assert labels == assign_defects(1000, 0.05, ["noise", "hum", "reversed"], 42)


def test_every_type_gets_one_recording():
    labels = assign_defects(20, 0.05, ["noise", "hum", "clipping"], 1)

    assert sorted(set(labels) - {CLEAN}) == ["clipping", "hum", "noise"]


def test_noise_reaches_requested_snr():
    signal = tone(300, 1.0)
    noisy = add_noise(signal, SAMPLE_RATE, np.random.default_rng(1), snr_db=10)

    assert 10 * np.log10(power(signal) / power(noisy - signal)) == pytest.approx(10, abs=0.2)


def test_hum_peaks_at_mains_frequency():
    signal = 0.01 * tone(700, 1.0)
    hummed = add_hum(signal, SAMPLE_RATE, RNG, frequency_hz=60, snr_db=-10)

    assert peak_frequency(hummed) == pytest.approx(60, abs=1)
    assert power(hummed - signal) == pytest.approx(10 * power(signal), rel=0.05)


def test_clipping_flattens_peaks():
    clipped = clip(tone(200, 0.1), SAMPLE_RATE, RNG, level=0.1)

    assert np.max(np.abs(clipped)) == pytest.approx(0.5)
    assert np.mean(np.isclose(np.abs(clipped), 0.5)) > 0.8


def test_filters_remove_their_band():
    mixture = tone(200, 1.0) + tone(3000, 1.0)
    muffled = low_pass(mixture, SAMPLE_RATE, RNG, cutoff_hz=500)
    thinned = high_pass(mixture, SAMPLE_RATE, RNG, cutoff_hz=1500)

    assert peak_frequency(muffled) == pytest.approx(200, abs=1)
    assert power(muffled - tone(200, 1.0)) < 1e-3 * power(mixture)
    assert peak_frequency(thinned) == pytest.approx(3000, abs=1)


def test_cut_off_reverse_speed_silence_offset():
    signal = tone(400, 1.0)

    assert cut_off(signal, SAMPLE_RATE, RNG, keep=0.4).size == 19200
    assert np.array_equal(reverse(signal, SAMPLE_RATE, RNG), signal[::-1])
    assert peak_frequency(change_speed(signal, SAMPLE_RATE, RNG, factor=1.25)) == pytest.approx(500, abs=2)
    assert np.max(np.abs(near_silence(signal, SAMPLE_RATE, RNG, gain_db=-40))) == pytest.approx(0.005, rel=0.01)
    assert np.mean(dc_offset(signal, SAMPLE_RATE, RNG, offset=0.3)) == pytest.approx(0.15, abs=1e-3)


def test_second_voice_level():
    signal = tone(300, 1.0)
    other = tone(1100, 1.0)
    mixed = second_voice(signal, SAMPLE_RATE, np.random.default_rng(2), level_db=-6, other=other)

    assert power(mixed - signal) == pytest.approx(power(signal) * 10 ** -0.6, rel=0.02)


def test_quantization_to_16_bit_steps():
    quantized = quantize_16_bit(np.array([1e-6, 0.5, 2.0, -2.0]))

    assert quantized.tolist() == [0.0, 0.5, 32767 / 32768, -1.0]


def test_planted_noise_ranks_above_clean(tmp_path):
    rng = np.random.default_rng(4)
    recordings = []
    for index in range(80):
        recordings.append(tmp_path / f"6_{index % 4:02d}_{index}.wav")
        write_wav(recordings[-1], 0.5 * speech_like(rng, 0.7), SAMPLE_RATE)
    labels = [CLEAN] * 80
    for index in (3, 17, 41, 66):
        labels[index] = "noise"
    settings = validate_params(default_params())["evaluate"]
    corrupted = corrupt(recordings, [f"{i % 4:02d}" for i in range(80)], labels, dict(settings, noise_snr_db=0))
    spectra = np.vstack(
        [magnitude_spectrum(preprocess(recording, 6800, 1.0, 5))[0] for recording in corrupted]
    )
    detection = detect_anomalies(
        spectra, test_size=0.1, random_state=42, contamination=0.1, pca_components=0.99, n_estimators=100
    )
    quality = evaluate_scores(labels, {"isolation_forest": detection.isolation_forest_score})

    assert quality["isolation_forest"]["overall"]["roc_auc"] > 0.9
    assert quality["isolation_forest"]["noise"]["precision_at_k"] >= 0.5


def test_sampled_curves_shape_and_ends():
    is_anomaly = np.array([True, False, True, False, False])
    roc, pr = sampled_curves(is_anomaly, {"a": np.array([0.9, 0.1, 0.8, 0.2, 0.3])})

    assert len(roc) == 101
    assert roc[0] == [0.0, 1.0]
    assert roc[-1] == [1.0, 1.0]
    assert pr[0] == [0.0, 1.0]
    assert pr[-1] == [1.0, 1.0]


def test_purity_of_hand_made_clusters():
    truth = ["hum", "hum", "noise", "noise", "noise", "speed"]

    assert purity(truth, np.array([0, 0, 1, 1, 0, 2])) == pytest.approx(5 / 6)
    assert purity(truth, np.array([0, 0, 1, 1, 1, 2])) == 1.0


def test_type_recovery_separates_distinct_profiles():
    rng = np.random.default_rng(8)
    errors = rng.uniform(0.9, 1.1, size=(120, 40)) * 1e-4
    labels = [CLEAN] * 120
    for index in range(0, 10):
        labels[index] = "hum"
        errors[index, :4] *= 50
    for index in range(10, 20):
        labels[index] = "noise"
        errors[index, 30:] *= 50
    settings = validate_params(default_params())["cluster"]
    # k-means splits the large clean group first, so 6 clusters leave one per defect type.
    result = type_recovery(errors, labels, dict(settings, n_clusters=6))

    assert result["purity"] == 1.0
    assert result["adjusted_rand_index"] == 1.0


def test_flagged_type_recovery_clusters_only_the_top_scores():
    rng = np.random.default_rng(9)
    errors = rng.uniform(0.9, 1.1, size=(200, 40)) * 1e-4
    labels = [CLEAN] * 200
    scores = rng.uniform(0, 0.5, size=200)
    for index in range(0, 12):
        labels[index] = "hum"
        errors[index, :4] *= 50
        scores[index] = 0.9
    for index in range(12, 24):
        labels[index] = "noise"
        errors[index, 30:] *= 50
        scores[index] = 0.9
    # One corrupted recording scores low and one clean recording high: the
    # clean one takes its place among the flagged.
    scores[23] = 0.1
    scores[150] = 0.95
    settings = validate_params(default_params())["cluster"]
    frequencies = np.linspace(50, 4000, 40)
    settings["band_edges_hz"] = [0, 250, 1000, 3000]
    result = flagged_type_recovery(errors, labels, scores, settings, frequencies)
    names = {
        next(iter(cluster["labels"])): cluster["name"] for cluster in result["clusters"].values()
    }

    # Over all 200 recordings a raised column averages (12 x 50 + 188) / 200 =
    # 3.94 times the base error. The 11 flagged noise recordings raise the
    # columns above 3,000 Hz 50 times: 50 / 3.94 = 12.7. The 12 hum ones
    # share their cluster with the clean false alarm: (12 x 50 + 1) / 13 /
    # 3.94 = 11.7 below 250 Hz.
    assert names == {"hum": "excess below 250 Hz (11.7x)", "noise": "excess above 3000 Hz (12.7x)"}
    assert sorted(cluster["size"] for cluster in result["clusters"].values()) == [11, 13]
    assert result["flagged"] == 24
    assert result["corrupted_among_flagged"] == 23
    assert result["n_clusters"] == 2
    assert result["purity"] == 1.0
    assert result["adjusted_rand_index"] == 1.0
