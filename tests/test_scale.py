"""Paths for large data sets: parallel and Dask spectra, streamed outputs, sampled fitting."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.decomposition import PCA

from audiomnist_anomalies import spectra as spectra_stage
from audiomnist_anomalies.detect import detect_anomalies, fit_pca, fit_sample
from audiomnist_anomalies.errors import PipelineError
from audiomnist_anomalies.mapping import pacmap_embedding
from audiomnist_anomalies.outputs import RowWriter, load_npy, row_batches, take_rows
from audiomnist_anomalies.spectra import compute_spectra
from synthetic import make_dataset, write_wav

SETTINGS = dict(
    test_size=0.1, random_state=42, contamination=0.1, pca_components=0.99, n_estimators=50
)


@pytest.fixture
def mixed_dataset(tmp_path):
    """Sixty recordings plus bad files spread over the file order."""
    root = make_dataset(tmp_path / "raw", speakers=4, repetitions=15)
    (root / "01" / "6_01_90.wav").write_text("not audio")
    shutil.copy(root / "02" / "6_02_3.wav", root / "02" / "6_02_93.wav")
    shutil.copy(root / "02" / "6_02_3.wav", root / "04" / "6_04_95.wav")
    write_wav(root / "03" / "6_03_94.wav", np.zeros(4800))
    (root / "03" / "notes.wav").write_text("x")
    return root


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def test_parallel_spectra_equal_sequential(mixed_dataset, monkeypatch):
    monkeypatch.setattr(spectra_stage, "MIN_PARALLEL_FILES", 0)
    monkeypatch.setattr(spectra_stage, "CHUNK_FILES", 7)
    sequential = compute_spectra(mixed_dataset, 6, 6800, 1.0, 5, n_jobs=1)
    parallel = compute_spectra(mixed_dataset, 6, 6800, 1.0, 5, n_jobs=2)

    assert sequential.spectra.shape == (60, 3401)
    assert np.array_equal(sequential.spectra, parallel.spectra)
    assert sequential.recordings == parallel.recordings
    assert parallel.rejected == sequential.rejected
    assert [path for path, _ in parallel.rejected] == [
        "01/6_01_90.wav",
        "02/6_02_93.wav",
        "03/6_03_94.wav",
        "04/6_04_95.wav",
        "03/notes.wav",
    ]
    assert dict(parallel.rejected)["04/6_04_95.wav"] == "identical content to 02/6_02_3.wav"


def test_streamed_spectra_file_equals_saved_array(mixed_dataset, tmp_path):
    in_memory = compute_spectra(mixed_dataset, 6, 6800, 1.0, 5)
    target = tmp_path / "out" / "spectra.npy"
    streamed = compute_spectra(mixed_dataset, 6, 6800, 1.0, 5, spectra_path=target)

    assert isinstance(streamed.spectra, np.memmap)
    assert target.read_bytes() == npy_bytes(in_memory.spectra)
    assert sorted(path.name for path in target.parent.iterdir()) == ["spectra.npy"]


def test_spectra_on_a_local_dask_cluster(mixed_dataset, monkeypatch):
    distributed = pytest.importorskip("distributed")
    monkeypatch.setattr(spectra_stage, "CHUNK_FILES", 9)
    local = compute_spectra(mixed_dataset, 6, 6800, 1.0, 5, n_jobs=1)
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address=None,
        processes=True,
    ) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        remote = compute_spectra(
            mixed_dataset, 6, 6800, 1.0, 5, dask_scheduler=cluster.scheduler_address
        )
        with distributed.Client(cluster.scheduler_address) as client:
            # Both workers received chunks of files.
            processed = client.run(
                lambda dask_worker: len(dask_worker.state.log) > 0
            )

    assert np.array_equal(local.spectra, remote.spectra)
    assert local.recordings == remote.recordings
    assert local.rejected == remote.rejected
    assert len(processed) == 2


def test_unreachable_dask_scheduler_is_a_clear_error(mixed_dataset, monkeypatch):
    pytest.importorskip("distributed")
    monkeypatch.setattr(spectra_stage, "DASK_CONNECT_TIMEOUT", 2.0)
    with pytest.raises(PipelineError, match=r"cannot reach the Dask scheduler at tcp://127\.0\.0\.1:9"):
        compute_spectra(mixed_dataset, 6, 6800, 1.0, 5, dask_scheduler="tcp://127.0.0.1:9")


@pytest.mark.timeout(120)
def test_http_server_as_dask_scheduler_times_out(mixed_dataset, monkeypatch):
    # An HTTP server accepts the connection and never answers the Dask
    # handshake; the client alone waited for ever.
    import http.server
    import threading
    import time

    pytest.importorskip("distributed")
    # Threaded, so that the connection the client leaves open does not keep
    # the server from shutting down.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(spectra_stage, "DASK_CONNECT_TIMEOUT", 2.0)
    address = f"tcp://127.0.0.1:{server.server_address[1]}"
    started = time.monotonic()
    try:
        with pytest.raises(PipelineError, match="no Dask scheduler answered within 7 s"):
            compute_spectra(mixed_dataset, 6, 6800, 1.0, 5, dask_scheduler=address)
    finally:
        server.shutdown()

    assert time.monotonic() - started < 30


def test_row_writer_and_batches_round_trip(tmp_path):
    matrix = np.arange(70 * 6, dtype=np.float32).reshape(70, 6) / 7
    target = tmp_path / "rows.npy"
    with RowWriter(target, 6) as writer:
        writer.append(matrix[:1])
        writer.append(matrix[1])
        writer.append(matrix[2:])
        stored = writer.finish()

    assert target.read_bytes() == npy_bytes(matrix)
    assert np.array_equal(stored, matrix)
    mapped = load_npy(target, mmap=True)
    batches = list(row_batches(mapped, 32))
    assert [start for start, _ in batches] == [0, 32, 64]
    assert not isinstance(batches[0][1], np.memmap)
    assert np.array_equal(np.vstack([rows for _, rows in batches]), matrix)
    assert np.array_equal(np.vstack([rows for _, rows in row_batches(matrix, 32)]), matrix)


def test_row_writer_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "rows.npy"
    with pytest.raises(RuntimeError):
        with RowWriter(target, 3) as writer:
            writer.append(np.ones(3))
            raise RuntimeError("stop")

    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shape", [(40, 120), (300, 25)])
def test_gram_pca_matches_full_svd(shape):
    rng = np.random.default_rng(3)
    data = rng.normal(size=shape) @ np.diag(np.linspace(3, 0.1, shape[1]))
    reference = PCA(n_components=0.9, svd_solver="full").fit(data)
    fitted = fit_pca(data, 0.9)

    assert fitted.n_components_ == reference.n_components_
    assert np.allclose(fitted.explained_variance_ratio_, reference.explained_variance_ratio_)
    assert np.allclose(np.abs(fitted.components_), np.abs(reference.components_), atol=1e-8)
    assert np.allclose(
        fitted.inverse_transform(fitted.transform(data)),
        reference.inverse_transform(reference.transform(data)),
        atol=1e-9,
    )
    assert np.all(fitted.components_[np.arange(fitted.n_components_), np.argmax(np.abs(fitted.components_), axis=1)] > 0)
    assert fit_pca(data, 4).n_components_ == 4


def test_fit_sample_is_seeded_and_limited():
    is_train = np.ones(1000, dtype=bool)
    is_train[::10] = False

    assert np.array_equal(fit_sample(is_train, 5000, 1), np.flatnonzero(is_train))
    sample = fit_sample(is_train, 200, 1)
    assert sample.shape == (200,)
    assert np.all(np.diff(sample) > 0)
    assert np.all(is_train[sample])
    assert np.array_equal(sample, fit_sample(is_train, 200, 1))
    assert not np.array_equal(sample, fit_sample(is_train, 200, 2))


def test_detection_fitted_on_a_sample_scores_every_recording(tmp_path):
    rng = np.random.default_rng(5)
    matrix = np.abs(rng.normal(size=(600, 40))).astype(np.float32)
    matrix[17] *= 25
    path = tmp_path / "errors.npy"
    sampled = detect_anomalies(matrix, **SETTINGS, max_fit_recordings=150, errors_path=path)
    again = detect_anomalies(matrix, **SETTINGS, max_fit_recordings=150)
    whole = detect_anomalies(matrix, **SETTINGS)

    assert sampled.isolation_forest_score.shape == (600,)
    assert isinstance(sampled.errors, np.memmap)
    assert np.array_equal(np.asarray(sampled.errors), again.errors)
    assert np.array_equal(sampled.reconstruction_error, again.reconstruction_error)
    assert int(np.argmax(sampled.reconstruction_error)) == 17
    assert int(np.argmax(sampled.isolation_forest_score)) == 17
    assert not np.array_equal(sampled.reconstruction_error, whole.reconstruction_error)


def test_map_fitted_on_a_sample_places_the_rest():
    rng = np.random.default_rng(6)
    centres = rng.normal(scale=8, size=(3, 30))
    groups = np.repeat(np.arange(3), 100)
    points = (centres[groups] + rng.normal(size=(300, 30))).astype(np.float32)
    settings = dict(
        n_neighbors=10, mn_ratio=0.5, fp_ratio=2.0, random_state=1, parameter_prefix="embed"
    )
    embedding, method = pacmap_embedding(points, max_fit=120, **settings)
    again, _ = pacmap_embedding(points, max_fit=120, **settings)

    assert method == "pacmap"
    assert embedding.shape == (300, 2)
    assert np.all(np.isfinite(embedding))
    assert np.array_equal(embedding, again)
    # Placed points land with their own group: the nearest group centre on
    # the map is the right one for nearly all of them.
    map_centres = np.array([embedding[groups == g].mean(axis=0) for g in range(3)])
    nearest = np.argmin(
        np.linalg.norm(embedding[:, None, :] - map_centres[None, :, :], axis=2), axis=1
    )
    assert np.mean(nearest == groups) > 0.95


def local_cluster(workers: int):
    distributed = pytest.importorskip("distributed")
    return distributed.LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address=None,
        processes=False,
        protocol="tcp://",
    )


def test_scheduler_without_workers_is_a_clear_error(mixed_dataset, monkeypatch):
    monkeypatch.setattr(spectra_stage, "DASK_NO_WORKERS_TIMEOUT", 2.0)
    monkeypatch.setattr(spectra_stage, "DASK_POLL_SECONDS", 0.5)
    with local_cluster(0) as cluster:
        with pytest.raises(PipelineError, match="has had no workers for 2 s"):
            compute_spectra(mixed_dataset, 6, 6800, 1.0, 5, dask_scheduler=cluster.scheduler_address)


def test_file_a_dask_worker_cannot_see_stops_the_stage(mixed_dataset, monkeypatch):
    listed = spectra_stage.recording_files(mixed_dataset)
    ghost = mixed_dataset / "02" / "6_02_77.wav"
    monkeypatch.setattr(spectra_stage, "recording_files", lambda raw_dir: listed + [ghost])
    with local_cluster(1) as cluster:
        with pytest.raises(PipelineError, match="Dask workers must see data/raw at the same path"):
            compute_spectra(mixed_dataset, 6, 6800, 1.0, 5, dask_scheduler=cluster.scheduler_address)


def test_scheduler_lost_during_the_run_is_a_clear_error(mixed_dataset):
    from audiomnist_anomalies.spectra import _dask_results

    paths = [str(path) for path in sorted(mixed_dataset.glob("0*/6_*.wav"))]
    settings = {"kind": "fft_magnitude", "sample_rate": 6800, "duration": 1.0, "smoothing_window": 5}
    cluster = local_cluster(1)
    results = _dask_results(cluster.scheduler_address, [[path] for path in paths], settings)
    first = next(results)
    cluster.close()
    with pytest.raises(PipelineError, match="compute.dask_scheduler"):
        for _ in results:
            pass
    assert first[0].reason is None


def test_take_rows_reads_the_same_rows_from_a_memory_map(tmp_path):
    matrix = np.arange(50 * 4, dtype=np.float32).reshape(50, 4)
    np.save(tmp_path / "m.npy", matrix)
    mapped = load_npy(tmp_path / "m.npy", mmap=True)
    indices = np.array([0, 7, 8, 49])

    rows = take_rows(mapped, indices)
    assert not isinstance(rows, np.memmap)
    assert np.array_equal(rows, matrix[indices])
    assert np.array_equal(take_rows(matrix, indices), matrix[indices])


def _square_or_fail(value: int) -> int:
    if value == 7:
        raise ValueError("seven")
    return value * value


def _blas_threads(_: int) -> list[int]:
    from threadpoolctl import threadpool_info

    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_ordered_map_keeps_order_across_workers():
    from audiomnist_anomalies.parallel import ordered_map

    assert list(ordered_map(_square_or_fail, [(value,) for value in range(6)], 2)) == [0, 1, 4, 9, 16, 25]
    assert list(ordered_map(_square_or_fail, [(value,) for value in range(3)], 1)) == [0, 1, 4]


def test_worker_count_of_n_jobs():
    from audiomnist_anomalies.parallel import worker_count

    assert worker_count(1) == 1
    assert worker_count(3) == 3
    assert worker_count(-1) == (os.cpu_count() or 1)


def test_ordered_map_raises_worker_error():
    from audiomnist_anomalies.parallel import ordered_map

    with pytest.raises(ValueError, match="seven"):
        list(ordered_map(_square_or_fail, [(value,) for value in range(10)], 2))


def _die_on_three(value: int) -> int:
    if value == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return value


def test_ordered_map_reports_a_killed_worker():
    from audiomnist_anomalies.parallel import ordered_map

    with pytest.raises(PipelineError, match="worker process of _die_on_three ended unexpectedly"):
        list(ordered_map(_die_on_three, [(value,) for value in range(8)], 2))


def _signal_handlers(_: int) -> tuple:
    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


def test_ordered_map_workers_leave_signals_to_the_stage():
    from audiomnist_anomalies.parallel import ordered_map

    handlers = list(ordered_map(_signal_handlers, [(value,) for value in range(4)], 2))

    assert set(handlers) == {(signal.SIG_IGN, signal.SIG_DFL)}


def test_ordered_map_workers_use_one_blas_thread():
    from audiomnist_anomalies.parallel import ordered_map

    counts = list(ordered_map(_blas_threads, [(value,) for value in range(4)], 2))

    assert all(count == [1] * len(count) and count for count in counts)


def test_ordered_map_reports_an_argument_it_cannot_send_without_hanging(tmp_path):
    # A lambda cannot be pickled; the executor's workers used to wait for it
    # for ever, in about one run of six. Run in a child so that a hang fails
    # the test instead of CI.
    script = tmp_path / "unpicklable.py"
    script.write_text(
        "from audiomnist_anomalies.parallel import ordered_map\n"
        "for attempt in range(20):\n"
        "    try:\n"
        "        list(ordered_map(abs, [(lambda: 1,), (lambda: 2,), (lambda: 3,)], 2))\n"
        "    except Exception as error:\n"
        "        print(type(error).__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60
    )

    assert done.stdout.split() == ["PicklingError"] * 20
    assert done.stderr == ""


def _touch(folder: str, value: int) -> int:
    (Path(folder) / str(value)).touch()
    return value


def test_ordered_map_bounds_work_ahead_of_caller(tmp_path):
    # Results the caller has not taken yet are held in memory; with every
    # item submitted at once, 100,000 recordings of spectra piled up 0.6 GB.
    import time

    from audiomnist_anomalies.parallel import IN_FLIGHT_PER_PROCESS, ordered_map

    results = ordered_map(_touch, [(str(tmp_path), value) for value in range(100)], 2)
    first = next(results)
    time.sleep(1.0)
    started = len(list(tmp_path.iterdir()))
    rest = list(results)

    assert first == 0
    assert started <= 2 * IN_FLIGHT_PER_PROCESS + 1
    assert rest == list(range(1, 100))
    assert len(list(tmp_path.iterdir())) == 100
