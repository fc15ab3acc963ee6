"""The spectra stage on generated data sets, bad files and metadata quirks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from audiomnist_anomalies.errors import PipelineError
from audiomnist_anomalies.metadata import clean_age, clean_room, read_metadata
from audiomnist_anomalies.outputs import read_csv
from audiomnist_anomalies.params import default_params, validate_params
from audiomnist_anomalies import spectra as spectra_module
from audiomnist_anomalies.spectra import compute_spectra, spectra
from synthetic import make_dataset, speech_like, tone, write_wav


def test_spectra_shape_and_order(dataset):
    result = compute_spectra(dataset, 6, 6800, 1.0, 5)

    assert result.spectra.shape == (60, 3401)
    assert result.spectra.dtype == np.float32
    assert np.allclose(result.spectra.max(axis=1), 1.0)
    assert [row["recording_id"] for row in result.recordings[:3]] == ["6_01_0", "6_01_1", "6_01_2"]
    assert result.recordings[15]["recording_id"] == "6_02_0"
    assert result.rejected == []


def test_recording_rows_carry_metadata(dataset):
    rows = compute_spectra(dataset, 6, 6800, 1.0, 5).recordings
    first = rows[0]

    assert first["speaker"] == "01"
    assert first["sample_rate_hz"] == 48000
    assert 0.45 <= first["duration_s"] <= 0.9
    assert first["gender"] == "female"
    assert first["age"] == 20
    assert first["recording_room"] == "kino"
    assert first["recording_room_raw"] == "Kino"
    assert rows[-1]["age"] is None
    assert rows[-1]["age_raw"] == "1234"


def test_bad_files_are_rejected_with_reasons(dataset):
    (dataset / "01" / "6_01_90.wav").write_text("not audio")
    (dataset / "01" / "6_01_91.wav").write_bytes(b"")
    shutil.copy(dataset / "02" / "6_02_3.wav", dataset / "02" / "6_02_93.wav")
    write_wav(dataset / "03" / "6_03_94.wav", np.zeros(4800))
    write_wav(dataset / "03" / "7_03_0.wav", tone(200, 0.5))
    write_wav(dataset / "03" / "six.wav", tone(200, 0.5))
    result = compute_spectra(dataset, 6, 6800, 1.0, 5)
    reasons = dict(result.rejected)

    assert result.spectra.shape[0] == 60
    assert len(result.rejected) == 6
    assert reasons["01/6_01_90.wav"] == "not a WAV file (no RIFF/WAVE header)"
    assert reasons["01/6_01_91.wav"] == "not a WAV file (no RIFF/WAVE header)"
    assert reasons["02/6_02_93.wav"] == "identical content to 02/6_02_3.wav"
    assert "silent" in reasons["03/6_03_94.wav"]
    assert reasons["03/7_03_0.wav"] == "recording of digit 7, not 6"
    assert "does not follow" in reasons["03/six.wav"]


def test_other_rates_and_long_recordings(tmp_path):
    rng = np.random.default_rng(1)
    write_wav(tmp_path / "01" / "6_01_0.wav", speech_like(rng, 0.6, 16000), 16000)
    write_wav(tmp_path / "01" / "6_01_1.wav", speech_like(rng, 1.6), 48000)
    result = compute_spectra(tmp_path, 6, 6800, 1.0, 5)

    assert [row["sample_rate_hz"] for row in result.recordings] == [16000, 48000]
    assert [row["trimmed"] for row in result.recordings] == [False, True]
    assert result.recordings[0]["gender"] == ""


def test_metadata_cleaning_rules():
    assert clean_age(30) == 30
    assert clean_age("25") == 25
    assert clean_age("1234") is None
    assert clean_age("unknown") is None
    assert clean_room("VR-Room") == "vr-room"
    assert clean_room("vr-romm") == "vr-room"


def test_unreadable_metadata_warns_and_continues(tmp_path, caplog):
    path = tmp_path / "audioMNIST_meta.txt"
    path.write_text("{broken json")

    assert read_metadata(path) == {}
    assert "cannot read metadata file" in caplog.text


def test_stage_writes_outputs(dataset, in_tmp):
    shutil.copytree(dataset, in_tmp / "data" / "raw")
    (in_tmp / "data" / "raw" / "04" / "bad.wav").write_text("x")
    params = validate_params(default_params())
    summary = spectra(params)
    rows = read_csv(in_tmp / "data" / "recordings.csv")
    metrics = json.loads((in_tmp / "metrics" / "data.json").read_text())

    assert "60 recordings x 1536 log_tf features" in summary
    assert np.load(in_tmp / "data" / "spectra.npy").shape == (60, 32 * 48)
    # Centre of the top band: the geometric mean of its edges, below 7,000 Hz.
    top = np.sqrt(7000 * 7000 * (50 / 7000) ** (1 / 48))
    assert np.load(in_tmp / "data" / "frequencies.npy")[-1] == pytest.approx(top)
    assert len(rows) == 60
    assert metrics["found"] == 61
    assert metrics["used"] == 60
    assert metrics["rejected_by_reason"] == {"name does not follow {digit}_{speaker}_{repetition}.wav": 1}
    assert read_csv(in_tmp / "data" / "rejected.csv")[0]["path"] == "04/bad.wav"


def test_rerun_gives_identical_files(tmp_path, monkeypatch):
    source = make_dataset(tmp_path / "source", speakers=2, repetitions=5)
    digests = []
    for run in range(2):
        work = tmp_path / f"run{run}"
        shutil.copytree(source, work / "data" / "raw")
        monkeypatch.chdir(work)
        spectra(validate_params(default_params()))
        digests.append(
            [(work / name).read_bytes() for name in ("data/spectra.npy", "data/recordings.csv")]
        )
    assert digests[0] == digests[1]


def test_metadata_entry_without_known_fields_warns(tmp_path, caplog):
    path = tmp_path / "audioMNIST_meta.txt"
    path.write_text('{"01": {"weird": 1}, "02": {"age": 30, "weird": 2}}')

    speakers = read_metadata(path)

    assert speakers["01"]["gender"] == ""
    assert speakers["02"]["age"] == 30
    assert "speaker '01' has none of the fields" in caplog.text
    assert "speaker '02'" not in caplog.text


def test_speakers_without_metadata_are_kept(tmp_path):
    source = make_dataset(tmp_path, speakers=4, repetitions=2, anomalies=False)
    entries = json.loads((source / "audioMNIST_meta.txt").read_text())
    del entries["02"]
    entries["03"]["favourite colour"] = "blue"
    (source / "audioMNIST_meta.txt").write_text(json.dumps(entries))
    rows = compute_spectra(source, 6, 6800, 1.0, 5).recordings
    by_speaker = {row["speaker"]: row for row in rows}

    assert len(rows) == 8
    assert by_speaker["02"]["gender"] == ""
    assert by_speaker["02"]["age"] is None
    assert by_speaker["03"]["gender"] == "male"


def test_missing_metadata_file_keeps_recordings(tmp_path, caplog):
    source = make_dataset(tmp_path, speakers=2, repetitions=2, anomalies=False)
    (source / "audioMNIST_meta.txt").unlink()
    rows = compute_spectra(source, 6, 6800, 1.0, 5).recordings

    assert len(rows) == 4
    assert "metadata file not found" in caplog.text


def test_odd_but_valid_recordings_are_used(tmp_path):
    rng = np.random.default_rng(5)
    speech = speech_like(rng, 0.6)
    write_wav(tmp_path / "01" / "6_01_0.wav", speech + 0.3)
    write_wav(tmp_path / "01" / "6_01_1.wav", np.clip(speech * 10, -0.5, 0.5))
    write_wav(tmp_path / "01" / "6_01_2.wav", np.array([0.1, -0.1]))
    write_wav(tmp_path / "elsewhere" / "6_02_0.wav", speech)
    result = compute_spectra(tmp_path, 6, 6800, 1.0, 5)

    assert [row["recording_id"] for row in result.recordings] == ["6_01_0", "6_01_1", "6_01_2", "6_02_0"]
    assert result.rejected == []
    assert result.spectra[0, 0] == 1.0
    assert result.recordings[3]["path"] == "elsewhere/6_02_0.wav"


def test_duplicate_ids_keep_the_first_usable_recording(dataset):
    # Sorted by path, the broken copy of 6_01_4 comes before the real one.
    (dataset / "00bad").mkdir()
    (dataset / "00bad" / "6_01_4.wav").write_text("not audio")
    (dataset / "zz").mkdir()
    write_wav(dataset / "zz" / "6_01_3.wav", tone(300, 0.5))
    result = compute_spectra(dataset, 6, 6800, 1.0, 5)
    used = {row["recording_id"]: row["path"] for row in result.recordings}

    assert result.spectra.shape[0] == 60
    assert used["6_01_4"] == "01/6_01_4.wav"
    assert used["6_01_3"] == "01/6_01_3.wav"
    # Rejections are listed in file order: speaker, repetition, then path.
    assert result.rejected == [
        ("zz/6_01_3.wav", "duplicate recording id 6_01_3"),
        ("00bad/6_01_4.wav", "not a WAV file (no RIFF/WAVE header)"),
    ]


def test_padded_repetition_is_the_same_take(dataset):
    write_wav(dataset / "01" / "6_01_003.wav", tone(300, 0.5))
    write_wav(dataset / "02" / "6_2_1.wav", tone(400, 0.5))
    result = compute_spectra(dataset, 6, 6800, 1.0, 5)

    # The first in file order (speaker, repetition, then path) is kept.
    assert result.spectra.shape[0] == 60
    assert sorted(result.rejected) == [
        ("01/6_01_3.wav", "same speaker and repetition as 01/6_01_003.wav"),
        ("02/6_2_1.wav", "same speaker and repetition as 02/6_02_1.wav"),
    ]


def test_too_many_features_stop_before_reading(in_tmp):
    params = default_params()
    params["spectra"].update(n_bands=1000, n_frames=1000, sample_rate=192000, max_frequency_hz=90000.0)
    params = validate_params(params)

    with pytest.raises(PipelineError, match="give 1000000 features per recording, more than 65536"):
        spectra(params)


@pytest.mark.parametrize("n_frames, warned", [(32, False), (1000, True)])
def test_many_repeated_bands_warn(caplog, n_frames, warned):
    # 1,000 frames of 32 samples give FFT bins 500 Hz apart, so 34 of the 48
    # log bands repeat a neighbour; the defaults repeat 4, below 130 Hz.
    settings = dict(
        validate_params(default_params())["spectra"], n_frames=n_frames, kind="log_tf"
    )

    spectra_module._warn_repeated_bands(settings, 16000)

    assert ("34 of the 48 bands repeat a neighbouring band" in caplog.text) == warned
    assert ("FFT bins 500 Hz apart" in caplog.text) == warned


def test_low_sample_rates_count_as_one_reason():
    reasons = [
        spectra_module._reason_kind(f"sample rate {rate} Hz is below 4000 Hz, too low for speech")
        for rate in (0, 1, 3999)
    ]

    assert reasons == ["sample rate below 4000 Hz"] * 3
    assert spectra_module._reason_kind("truncated WAV file: the header declares 9 bytes") == (
        "truncated WAV file"
    )
