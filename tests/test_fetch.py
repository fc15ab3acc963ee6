"""Stage ``fetch``: listing, download, verification, resume and local copy.

The remote tests run against a fake upstream repository served by
``http.server`` on 127.0.0.1. It serves the GitHub git trees API under
``/api`` and raw files under ``/raw``, supports ``Range`` requests, records
every request, and fails the requests that a test plans to fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from audiomnist_anomalies.errors import DownloadError, ParameterError
from audiomnist_anomalies.fetch import (
    MAX_BACKOFF_SECONDS,
    STOP_SECONDS,
    Downloader,
    RemoteFile,
    fetch_local,
    fetch_remote,
    git_blob_sha1,
    is_selected,
    list_remote_files,
    load_manifest,
    select_remote_files,
)
from synthetic import make_dataset, metadata, speech_like, wav_bytes

REPO = "soerenab/AudioMNIST"
COMMIT = "3f1c5e7a9b2d4f6081a3c5e7092b4d6f8a0c1e2d"  # made up for the fake upstream
PINNED_COMMIT = "630d7dab4c040882834de6fa21baf9a60372accd"
API_PREFIX = f"/api/repos/{REPO}/git/trees/"
RAW_PREFIX = f"/raw/{REPO}/{COMMIT}/"
REAL_DATA = Path(
    os.environ.get("AUDIOMNIST_DATA", Path(__file__).parents[2] / "shared/audiomnist/data")
)

# 0.75 s of 16-bit audio at 48 kHz is 72 kB, a typical upstream recording.
# LONG is 288 kB, so half of it spans more than two 64 KiB read chunks.
LONG = "data/03/6_03_1.wav"
TYPICAL = "data/01/6_01_0.wav"
METADATA = "data/audioMNIST_meta.txt"


def _make_files() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    files = {"README.md": b"# fake upstream\n"}
    for speaker in ("01", "02", "03"):
        for name in (f"6_{speaker}_0", f"6_{speaker}_1", f"3_{speaker}_0"):
            path = f"data/{speaker}/{name}.wav"
            duration = 3.0 if path == LONG else 0.75
            files[path] = wav_bytes(speech_like(rng, duration))
    files[METADATA] = json.dumps(metadata(["01", "02", "03"])).encode()
    return files


FILES = _make_files()
DIGIT_SIX = sorted(path for path in FILES if re.search(r"/6_\d+_\d+\.wav$", path)) + [METADATA]
FOLDERS = sorted({"/".join(path.split("/")[:depth]) for path in FILES
                  for depth in range(1, path.count("/") + 1)})


def blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def tree_sha1(folder: str) -> str:
    return hashlib.sha1(f"tree {folder}".encode()).hexdigest()


def remote_file(path: str) -> RemoteFile:
    return RemoteFile(path, len(FILES[path]), blob_sha1(FILES[path]))


def tree_entries(folder: str, recursive: bool) -> list[dict]:
    """Return git trees API entries below ``folder`` ("" is the root)."""
    prefix = f"{folder}/" if folder else ""
    entries = []
    for name in FOLDERS:
        if name.startswith(prefix) and (recursive or "/" not in name[len(prefix):]):
            entries.append({"path": name[len(prefix):], "mode": "040000",
                            "type": "tree", "sha": tree_sha1(name)})
    for path, content in sorted(FILES.items()):
        if path.startswith(prefix) and (recursive or "/" not in path[len(prefix):]):
            entries.append({"path": path[len(prefix):], "mode": "100644", "type": "blob",
                            "sha": blob_sha1(content), "size": len(content)})
    return entries


@dataclass(frozen=True)
class Request:
    path: str
    range: str | None
    authorization: str | None


class FakeUpstream(ThreadingHTTPServer):
    """An HTTP server with the trees API and raw files of a fake AudioMNIST."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), UpstreamHandler)
        self.lock = threading.Lock()
        self.requests: list[Request] = []
        # Bytes served for each raw path, so a test can corrupt or remove one.
        self.served = dict(FILES)
        # Actions for the next requests to a raw path or API path, in order.
        # An int is the HTTP status to respond with, and "cut" closes the
        # connection after half of the body.
        self.plan: dict[str, list[int | str]] = {}
        self.honour_range = True
        self.truncated = False
        # Body sent for every trees API request instead of the real listing.
        self.tree_body: bytes | None = None
        # Seconds to wait before each 4 KiB piece of a raw file: a slow link.
        self.piece_delay = 0.0
        base = f"http://127.0.0.1:{self.server_address[1]}"
        self.api_url = f"{base}/api"
        self.raw_url = f"{base}/raw"

    def raw_requests(self, path: str) -> list[Request]:
        with self.lock:
            return [request for request in self.requests if request.path == RAW_PREFIX + path]

    def next_action(self, key: str) -> int | str | None:
        with self.lock:
            actions = self.plan.get(key)
            return actions.pop(0) if actions else None


class UpstreamHandler(BaseHTTPRequestHandler):
    server: FakeUpstream

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        upstream = self.server
        with upstream.lock:
            upstream.requests.append(
                Request(self.path, self.headers.get("Range"), self.headers.get("Authorization"))
            )
        key = self.path.removeprefix(RAW_PREFIX)
        action = upstream.next_action(key)
        if isinstance(action, int):
            self.reply(action, b"planned failure")
        elif self.path.startswith(API_PREFIX):
            self.send_tree(self.path[len(API_PREFIX):])
        elif self.path.startswith(RAW_PREFIX):
            self.send_file(key, cut=action == "cut")
        else:
            self.reply(404, b"404: Not Found")

    def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def send_tree(self, request: str) -> None:
        if self.server.tree_body is not None:
            self.reply(200, self.server.tree_body, {"Content-Type": "application/json"})
            return
        sha, _, query = request.partition("?")
        folders = {tree_sha1(folder): folder for folder in FOLDERS}
        folders[COMMIT] = ""
        if sha not in folders:
            self.reply(404, b'{"message": "Not Found"}')
            return
        recursive = query == "recursive=1"
        entries = tree_entries(folders[sha], recursive)
        truncated = recursive and self.server.truncated
        if truncated:
            entries = entries[:2]
        body = json.dumps({"sha": sha, "tree": entries, "truncated": truncated})
        self.reply(200, body.encode(), {"Content-Type": "application/json"})

    def send_file(self, path: str, cut: bool) -> None:
        content = self.server.served.get(path)
        if content is None:
            self.reply(404, b"404: Not Found")
            return
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(match[1]) if match and self.server.honour_range else 0
        if start >= len(content) > 0:
            self.reply(416, b"", {"Content-Range": f"bytes */{len(content)}"})
            return
        body = content[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        self.end_headers()
        # HTTP/1.0: returning closes the connection, so a cut body arrives short.
        body = body[: len(body) // 2] if cut else body
        if not self.server.piece_delay:
            self.wfile.write(body)
            return
        for start in range(0, len(body), 4096):
            time.sleep(self.server.piece_delay)
            try:
                self.wfile.write(body[start : start + 4096])
            except OSError:
                return  # the client hung up


@pytest.fixture
def direct_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep requests off any proxy and send no GitHub token."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "GITHUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


@pytest.fixture
def upstream(direct_connections):
    """Start a fake upstream on 127.0.0.1 and stop it after the test."""
    server = FakeUpstream()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def run_fetch(upstream: FakeUpstream, tmp_path: Path, **options) -> int:
    arguments = dict(api_url=upstream.api_url, raw_url=upstream.raw_url, retries=2,
                     timeout=5.0, workers=4, download_dir=tmp_path / "download",
                     sleep=lambda seconds: None)
    arguments.update(options)
    return fetch_remote(REPO, COMMIT, 6, tmp_path / "raw", **arguments)


def raw_requests(upstream: FakeUpstream) -> list[Request]:
    with upstream.lock:
        return [request for request in upstream.requests if request.path.startswith(RAW_PREFIX)]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- small helpers ---------------------------------------------------------


def test_git_blob_sha1_known_values(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    hello = tmp_path / "hello"
    hello.write_bytes(b"hello\n")

    assert git_blob_sha1(empty) == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert git_blob_sha1(hello) == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_git_blob_sha1_matches_git(tmp_path):
    path = tmp_path / "6_01_0.wav"
    path.write_bytes(FILES[TYPICAL])
    expected = subprocess.run(["git", "hash-object", str(path)], capture_output=True,
                              text=True, check=True).stdout.strip()

    assert git_blob_sha1(path) == expected


@pytest.mark.parametrize(
    ("relative_path", "selected"),
    [
        ("audioMNIST_meta.txt", True),
        ("01/6_01_0.wav", True),
        ("60/6_60_49.wav", True),
        ("01/7_01_0.wav", False),
        ("01/16_01_0.wav", False),
        ("6_01_0.wav", False),
        ("01/02/6_01_0.wav", False),
        ("01/6_01_0.WAV", False),
        ("01/audioMNIST_meta.txt", False),
    ],
)
def test_is_selected_path_table(relative_path, selected):
    assert is_selected(relative_path, 6) is selected


def test_is_selected_rejects_trailing_newline():
    assert is_selected("01/6_01_0.wav\n", 6) is False


def test_load_manifest_unknown_commit():
    assert load_manifest(COMMIT, 6) is None


def test_pinned_manifest_lists_digit_six():
    files = load_manifest(PINNED_COMMIT, 6)
    recordings = [file for file in files if file.path.endswith(".wav")]

    assert len(recordings) == 3000
    assert len(files) == 3001
    assert METADATA in {file.path for file in files}
    assert all(is_selected(file.path[len("data/"):], 6) for file in files)
    assert all(re.fullmatch(r"[0-9a-f]{40}", file.git_sha1) for file in files)


@pytest.mark.realdata
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"no local AudioMNIST copy at {REAL_DATA}")
def test_manifest_matches_local_copy():
    files = load_manifest(PINNED_COMMIT, 6)
    sample = random.Random(0).sample(files, 20)

    for file in sample:
        local = REAL_DATA / file.path[len("data/"):]
        assert local.stat().st_size == file.size, file.path
        assert git_blob_sha1(local) == file.git_sha1, file.path


# --- listing ---------------------------------------------------------------


def test_select_keeps_digit_files():
    files = select_remote_files(tree_entries("", recursive=True), 6)

    assert [file.path for file in files] == DIGIT_SIX
    assert files[0] == remote_file(DIGIT_SIX[0])


@pytest.mark.parametrize(
    "path",
    ["data/../evil.wav", "data/01/../../x", "data//etc/6_01_0.wav", "data/./01/6_01_0.wav",
     "data/01\\..\\6_01_0.wav"],
)
def test_select_rejects_unsafe_path(path):
    entries = tree_entries("", recursive=True) + [
        {"path": path, "type": "blob", "sha": "0" * 40, "size": 4}
    ]

    with pytest.raises(DownloadError, match="unsafe path") as error:
        select_remote_files(entries, 6)
    assert repr(path) in str(error.value)


@pytest.mark.parametrize("path", ["/data/01/6_01_9.wav", "/etc/6_01_9.wav"])
def test_select_rejects_absolute_paths(path):
    entries = tree_entries("", recursive=True) + [
        {"path": path, "type": "blob", "sha": "0" * 40, "size": 4},
    ]

    with pytest.raises(DownloadError, match="unsafe path"):
        select_remote_files(entries, 6)


@pytest.mark.parametrize(
    "change", [{"sha": "abc"}, {"size": "72080"}, {"size": None}, {"size": -1}, {"size": True}]
)
def test_select_rejects_bad_hash_or_size(change):
    entries = [dict(entry, **change) if entry["path"] == TYPICAL else entry
               for entry in tree_entries("", recursive=True)]

    with pytest.raises(DownloadError, match=re.escape(TYPICAL)):
        select_remote_files(entries, 6)


def test_select_rejects_path_listed_twice():
    entries = tree_entries("", recursive=True)
    twice = entries + [entry for entry in entries if entry["path"] == TYPICAL]

    # Two threads wrote the same partial file, which failed as "input not found".
    with pytest.raises(DownloadError, match=f"has {TYPICAL} twice"):
        select_remote_files(twice, 6)


def test_cut_transfer_is_not_called_unreachable(upstream, tmp_path):
    upstream.plan[TYPICAL] = ["cut", "cut"]

    with pytest.raises(DownloadError) as error:
        download(upstream, TYPICAL, tmp_path / "6_01_0.wav", retries=1)

    message = str(error.value)
    assert "broke off during the transfer after 2 attempts" in message
    assert "cannot reach" not in message


def test_select_rejects_missing_digit():
    with pytest.raises(DownloadError, match="no recordings of digit 4"):
        select_remote_files(tree_entries("", recursive=True), 4)


def test_list_remote_files_recursive(upstream):
    files = list_remote_files(Downloader(0, 5.0), upstream.api_url, REPO, COMMIT, 6)

    assert files == [remote_file(path) for path in DIGIT_SIX]
    assert [request.path for request in upstream.requests] == [
        f"{API_PREFIX}{COMMIT}?recursive=1"
    ]


def test_truncated_listing_walks_data(upstream):
    upstream.truncated = True

    files = list_remote_files(Downloader(0, 5.0), upstream.api_url, REPO, COMMIT, 6)

    assert files == [remote_file(path) for path in DIGIT_SIX]
    requested = {request.path for request in upstream.requests}
    expected = {f"{API_PREFIX}{COMMIT}?recursive=1", f"{API_PREFIX}{COMMIT}",
                f"{API_PREFIX}{tree_sha1('data')}"}
    expected |= {f"{API_PREFIX}{tree_sha1(f'data/{speaker}')}" for speaker in ("01", "02", "03")}
    assert requested == expected


def test_get_json_decodes_listing(upstream):
    listing = Downloader(0, 5.0).get_json(f"{upstream.api_url}/repos/{REPO}/git/trees/{COMMIT}")

    assert listing["tree"] == tree_entries("", recursive=False)
    assert listing["truncated"] is False


def test_get_json_sends_github_token(upstream, monkeypatch):
    monkeypatch.setenv("GITHUB_TOKEN", "test-token-123")

    Downloader(0, 5.0).get_json(f"{upstream.api_url}/repos/{REPO}/git/trees/{COMMIT}")

    assert upstream.requests[0].authorization == "Bearer test-token-123"


def test_get_json_retries_503(upstream):
    key = f"{API_PREFIX}{COMMIT}"
    upstream.plan[key] = [503, 503]
    waits = []

    listing = Downloader(2, 5.0, sleep=waits.append).get_json(upstream.api_url + key[4:])

    assert listing["sha"] == COMMIT
    assert len(upstream.requests) == 3
    assert waits == [0.25, 0.5]


@pytest.mark.parametrize(
    "body, message",
    [
        (b"[1, 2]", "is not a git tree listing"),
        (b'"hello"', "is not a git tree listing"),
        (b'{"tree": 5}', "is not a git tree listing"),
        (b'{"tree": [1, 2]}', "has an entry that is not a JSON object: 1"),
    ],
)
def test_malformed_listing_is_download_error(upstream, body, message):
    upstream.tree_body = body
    downloader = Downloader(0, 5.0)

    # These raised AttributeError with a traceback.
    with pytest.raises(DownloadError, match=message):
        list_remote_files(downloader, upstream.api_url, REPO, COMMIT, 3)


def test_get_json_404_fails_at_once(upstream):
    url = f"{upstream.api_url}/repos/{REPO}/git/trees/{'f' * 40}"

    with pytest.raises(DownloadError, match="HTTP 404"):
        Downloader(3, 5.0, sleep=lambda seconds: None).get_json(url)
    assert len(upstream.requests) == 1


def test_get_json_rejects_non_json(upstream):
    url = f"{upstream.raw_url}/{REPO}/{COMMIT}/README.md"

    with pytest.raises(DownloadError, match="not JSON"):
        Downloader(0, 5.0).get_json(url)


# --- downloads -------------------------------------------------------------


def download(upstream: FakeUpstream, path: str, target: Path, retries: int = 2) -> bool:
    downloader = Downloader(retries, 5.0, sleep=lambda seconds: None)
    return downloader.download(f"{upstream.raw_url}/{REPO}/{COMMIT}/{path}",
                               remote_file(path), target)


def test_fetch_remote_downloads_digit_six(upstream, tmp_path):
    count = run_fetch(upstream, tmp_path)

    output = tmp_path / "raw"
    written = sorted(path.relative_to(output).as_posix() for path in output.rglob("*")
                     if path.is_file())
    assert count == 6
    assert written == sorted([path[len("data/"):] for path in DIGIT_SIX] + ["SHA256SUMS"])
    for path in DIGIT_SIX:
        assert (output / path[len("data/"):]).read_bytes() == FILES[path], path
    requested = sorted(request.path.removeprefix(RAW_PREFIX) for request in upstream.requests
                       if request.path.startswith(RAW_PREFIX))
    assert requested == DIGIT_SIX
    assert not (tmp_path / "download" / f"{COMMIT}-digit6").exists()


def test_fetch_remote_writes_sha256sums(upstream, tmp_path):
    run_fetch(upstream, tmp_path)

    lines = (tmp_path / "raw" / "SHA256SUMS").read_text().splitlines()
    expected = [f"{hashlib.sha256(FILES[path]).hexdigest()}  {path[len('data/'):]}"
                for path in sorted(DIGIT_SIX)]
    assert lines == expected


def test_corrupted_file_is_rejected(upstream, tmp_path):
    bad = "data/02/6_02_1.wav"
    upstream.served[bad] = bytes(len(FILES[bad]))

    with pytest.raises(DownloadError) as error:
        run_fetch(upstream, tmp_path)

    assert bad in str(error.value)
    assert "git blob hash" in str(error.value)
    assert not (tmp_path / "raw").exists()
    assert list(tmp_path.rglob("6_02_1.wav*")) == []
    assert len(upstream.raw_requests(bad)) == 3


def test_rerun_fetches_only_missing_files(upstream, tmp_path):
    bad = "data/02/6_02_1.wav"
    upstream.served[bad] = bytes(len(FILES[bad]))
    with pytest.raises(DownloadError):
        run_fetch(upstream, tmp_path, retries=0)
    # The failure cancels the other downloads, so which files are already
    # verified, or complete but not yet verified, depends on thread timing.
    staging = tmp_path / "download" / f"{COMMIT}-digit6"
    verified = set()
    for path in staging.rglob("*"):
        name = "data/" + path.relative_to(staging).as_posix().removesuffix(".part")
        if path.is_file() and path.stat().st_size == len(FILES[name]):
            verified.add(name)
    upstream.served[bad] = FILES[bad]
    upstream.requests.clear()

    assert run_fetch(upstream, tmp_path) == 6
    requested = [request.path for request in upstream.requests]
    assert requested[0] == f"{API_PREFIX}{COMMIT}?recursive=1"
    assert sorted(requested[1:]) == sorted(RAW_PREFIX + path for path in set(DIGIT_SIX) - verified)
    assert bad not in verified
    assert (tmp_path / "raw" / "02" / "6_02_1.wav").read_bytes() == FILES[bad]


def test_interrupted_download_resumes_with_range(upstream, tmp_path):
    upstream.plan[LONG] = ["cut"]

    run_fetch(upstream, tmp_path)

    requests = upstream.raw_requests(LONG)
    assert len(requests) == 2
    assert requests[0].range is None
    offset = int(re.fullmatch(r"bytes=(\d+)-", requests[1].range)[1])
    assert offset > 0
    assert offset <= len(FILES[LONG]) // 2
    assert (tmp_path / "raw" / "03" / "6_03_1.wav").read_bytes() == FILES[LONG]


def test_typical_recording_resumes_with_range(upstream, tmp_path):
    upstream.plan[TYPICAL] = ["cut"]

    download(upstream, TYPICAL, tmp_path / "6_01_0.wav")

    assert upstream.raw_requests(TYPICAL)[1].range is not None


def test_leftover_part_file_is_resumed(upstream, tmp_path):
    target = tmp_path / "6_03_1.wav"
    target.with_name("6_03_1.wav.part").write_bytes(FILES[LONG][:1000])

    assert download(upstream, LONG, target) is True
    assert [request.range for request in upstream.raw_requests(LONG)] == ["bytes=1000-"]
    assert target.read_bytes() == FILES[LONG]
    assert not target.with_name("6_03_1.wav.part").exists()


def test_failed_run_leaves_resumable_part(upstream, tmp_path):
    upstream.plan[LONG] = ["cut"]
    with pytest.raises(DownloadError):
        run_fetch(upstream, tmp_path, retries=0)
    upstream.requests.clear()

    assert run_fetch(upstream, tmp_path, retries=0) == 6
    ranges = [request.range for request in upstream.raw_requests(LONG)]
    assert len(ranges) == 1
    assert re.fullmatch(r"bytes=[1-9]\d*-", ranges[0] or "")
    assert (tmp_path / "raw" / "03" / "6_03_1.wav").read_bytes() == FILES[LONG]


def test_wrong_part_file_restarts(upstream, tmp_path):
    target = tmp_path / "6_03_1.wav"
    target.with_name("6_03_1.wav.part").write_bytes(b"\xff" * 1000)

    assert download(upstream, LONG, target) is True
    assert [request.range for request in upstream.raw_requests(LONG)] == ["bytes=1000-", None]
    assert target.read_bytes() == FILES[LONG]


def test_wrong_part_restarts_without_retries(upstream, tmp_path):
    target = tmp_path / "6_03_1.wav"
    target.with_name("6_03_1.wav.part").write_bytes(b"\xff" * 1000)

    # Starting over from a bad kept part does not use up one of the attempts.
    assert download(upstream, LONG, target, retries=0) is True
    assert target.read_bytes() == FILES[LONG]


def test_short_complete_response_is_not_kept(upstream, tmp_path):
    upstream.served[LONG] = b"<html>not the recording</html>"
    target = tmp_path / "6_03_1.wav"

    with pytest.raises(DownloadError) as error:
        download(upstream, LONG, target, retries=0)

    message = str(error.value)
    assert f"the server's complete response has 30 bytes, the file of the pinned commit {len(FILES[LONG])}" in message
    assert "data.raw_url" in message
    assert "(after 1 attempt)" in message
    assert not target.with_name("6_03_1.wav.part").exists()
    upstream.served[LONG] = FILES[LONG]
    assert download(upstream, LONG, target, retries=0) is True
    assert [request.range for request in upstream.raw_requests(LONG)] == [None, None]


def test_server_ignoring_range_still_works(upstream, tmp_path):
    upstream.honour_range = False
    target = tmp_path / "6_03_1.wav"
    target.with_name("6_03_1.wav.part").write_bytes(FILES[LONG][:1000])

    assert download(upstream, LONG, target) is True
    assert [request.range for request in upstream.raw_requests(LONG)] == ["bytes=1000-"]
    assert target.read_bytes() == FILES[LONG]


def test_verified_target_is_not_downloaded(upstream, tmp_path):
    target = tmp_path / "6_01_0.wav"
    target.write_bytes(FILES[TYPICAL])

    assert download(upstream, TYPICAL, target) is False
    assert upstream.requests == []


def test_wrong_target_is_replaced(upstream, tmp_path):
    target = tmp_path / "6_01_0.wav"
    target.write_bytes(b"stale")

    assert download(upstream, TYPICAL, target) is True
    assert target.read_bytes() == FILES[TYPICAL]


def test_missing_file_fails_at_once(upstream, tmp_path):
    missing = "data/02/6_02_0.wav"
    del upstream.served[missing]

    with pytest.raises(DownloadError, match="HTTP 404") as error:
        run_fetch(upstream, tmp_path, retries=3)

    assert missing in str(error.value)
    assert len(upstream.raw_requests(missing)) == 1
    assert not (tmp_path / "raw").exists()


def test_transient_503_is_retried(upstream, tmp_path):
    upstream.plan[TYPICAL] = [503, 503]
    waits = []
    downloader = Downloader(2, 5.0, sleep=waits.append)

    downloader.download(f"{upstream.raw_url}/{REPO}/{COMMIT}/{TYPICAL}",
                        remote_file(TYPICAL), tmp_path / "6_01_0.wav")

    assert len(upstream.raw_requests(TYPICAL)) == 3
    assert waits == [0.25, 0.5]
    assert (tmp_path / "6_01_0.wav").read_bytes() == FILES[TYPICAL]


def test_persistent_503_gives_up(upstream, tmp_path):
    upstream.plan[TYPICAL] = [503, 503, 503, 503]

    with pytest.raises(DownloadError, match="503"):
        download(upstream, TYPICAL, tmp_path / "6_01_0.wav", retries=2)
    assert len(upstream.raw_requests(TYPICAL)) == 3


@pytest.mark.timeout(30)
def test_unreachable_raw_host_fails_fast(upstream, tmp_path):
    raw_url = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()

    with pytest.raises(DownloadError) as error:
        run_fetch(upstream, tmp_path, raw_url=raw_url, retries=2, sleep=time.sleep)

    assert time.monotonic() - started < 10
    assert "cannot reach" in str(error.value)
    assert "data.source" in str(error.value)
    assert "local copy" in str(error.value)
    assert not (tmp_path / "raw").exists()


@pytest.mark.timeout(30)
def test_unreachable_api_fails_fast(direct_connections, tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()

    with pytest.raises(DownloadError, match="data.source") as error:
        fetch_remote(REPO, COMMIT, 6, tmp_path / "raw", api_url=url, raw_url=url, retries=2,
                     timeout=5.0, workers=2, download_dir=tmp_path / "download")

    assert time.monotonic() - started < 10
    assert "ConnectionError" in str(error.value)


def interrupted_fetch(upstream: FakeUpstream, tmp_path: Path, **options) -> None:
    """Run fetch_remote and send this process SIGINT (Ctrl-C) after 1 s."""
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_fetch(upstream, tmp_path, **options)
    finally:
        timer.cancel()


@pytest.mark.timeout(60)
def test_interrupt_stops_running_and_queued_downloads(upstream, tmp_path, ctrl_c):
    # About 0.5 s per 4 KiB piece: each file takes several seconds.
    upstream.piece_delay = 0.5
    started = time.monotonic()
    interrupted_fetch(upstream, tmp_path, workers=2)
    stopped = time.monotonic()
    requests_at_stop = len(raw_requests(upstream))
    time.sleep(1.5)

    # The two running transfers ended at their next piece and no queued file started.
    assert stopped - started < 1.0 + 3.0
    assert requests_at_stop == 2
    assert len(raw_requests(upstream)) == 2
    assert not (tmp_path / "raw").exists()
    parts = list((tmp_path / "download").rglob("*.part"))
    assert len(parts) == 2
    assert all(part.stat().st_size > 0 for part in parts)


@pytest.mark.timeout(60)
def test_interrupt_does_not_wait_for_stalled_server(upstream, tmp_path, ctrl_c):
    # The first piece of each file would come after 30 s, within data.timeout.
    upstream.piece_delay = 30.0
    started = time.monotonic()
    interrupted_fetch(upstream, tmp_path, workers=2, timeout=40.0)

    # It waited for the read time-out of 40 s before.
    assert time.monotonic() - started < 1.0 + 2 * STOP_SECONDS + 1.0
    assert len(raw_requests(upstream)) == 2


@pytest.mark.timeout(60)
def test_retry_wait_ends_on_cancel():
    downloader = Downloader(10, 5.0)
    timer = threading.Timer(0.5, downloader.cancelled.set)
    started = time.monotonic()
    timer.start()

    # The seventh retry waits 16 s unless the download is cancelled.
    with pytest.raises(DownloadError, match="cancelled"):
        downloader._backoff(6, "http://127.0.0.1/x", None)
    assert time.monotonic() - started < 3.0


def test_retry_waits_are_capped():
    waits = []
    downloader = Downloader(20, 5.0, sleep=waits.append)
    for attempt in range(20):
        downloader._backoff(attempt, "http://127.0.0.1/x", None)

    assert waits[:3] == [0.25, 0.5, 1.0]
    assert max(waits) == MAX_BACKOFF_SECONDS
    assert sum(waits) < 20 * MAX_BACKOFF_SECONDS


@pytest.mark.timeout(60)
def test_many_files_stop_after_first_failure(direct_connections, tmp_path, monkeypatch):
    import audiomnist_anomalies.fetch as fetch_module

    files = [
        RemoteFile(f"data/{speaker:02d}/6_{speaker:02d}_{repetition}.wav", 10, "0" * 40)
        for speaker in range(1, 21)
        for repetition in range(50)
    ]
    monkeypatch.setattr(fetch_module, "load_manifest", lambda commit, digit: files)
    url = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()

    with pytest.raises(DownloadError, match="cannot reach"):
        fetch_remote(REPO, COMMIT, 6, tmp_path / "raw", api_url=url, raw_url=url, retries=2,
                     timeout=5.0, workers=8, download_dir=tmp_path / "download")

    assert time.monotonic() - started < 15
    assert not (tmp_path / "raw").exists()


# --- local copy ------------------------------------------------------------


def test_fetch_local_copies_digit_six(tmp_path):
    source = make_dataset(tmp_path / "source", speakers=2, repetitions=3, anomalies=False)
    (source / "01" / "3_01_0.wav").write_bytes(FILES["data/01/3_01_0.wav"])

    count = fetch_local(source, 6, tmp_path / "raw")

    output = tmp_path / "raw"
    copied = sorted(path.relative_to(output).as_posix() for path in output.rglob("*")
                    if path.is_file())
    recordings = [f"{speaker}/6_{speaker}_{repetition}.wav"
                  for speaker in ("01", "02") for repetition in range(3)]
    assert count == 6
    assert copied == sorted(recordings + ["audioMNIST_meta.txt", "SHA256SUMS"])
    for name in recordings + ["audioMNIST_meta.txt"]:
        assert (output / name).read_bytes() == (source / name).read_bytes(), name


def test_fetch_local_warns_about_folders_and_broken_links(tmp_path, caplog):
    source = make_dataset(tmp_path / "source", speakers=1, repetitions=2, anomalies=False)
    (source / "01" / "6_01_44.wav").mkdir()
    (source / "01" / "6_01_45.wav").symlink_to(tmp_path / "gone.wav")

    count = fetch_local(source, 6, tmp_path / "raw")

    assert count == 2
    assert "skipped " + str(source / "01" / "6_01_44.wav") + ": it is a folder" in caplog.text
    assert str(source / "01" / "6_01_45.wav") + ": it is a broken link" in caplog.text


def test_fetch_local_missing_folder(tmp_path):
    missing = tmp_path / "no-such-folder"

    with pytest.raises(ParameterError, match="is not a folder") as error:
        fetch_local(missing, 6, tmp_path / "raw")

    assert str(missing) in str(error.value)
    assert "local copy of the upstream data/ folder" in str(error.value)
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize("relative", ["raw", "raw/01", "."])
def test_fetch_local_source_overlapping_output(tmp_path, relative):
    # DVC deletes data/raw before the stage runs, so data.source pointing into
    # it used to fail as "is not a folder".
    output = tmp_path / "raw"
    (output / "01").mkdir(parents=True)
    (output / "01" / "6_01_0.wav").write_bytes(FILES["data/01/6_01_0.wav"])
    source = tmp_path / relative

    with pytest.raises(ParameterError, match="overlaps .*raw, the folder this stage writes"):
        fetch_local(source, 6, output)

    assert (output / "01" / "6_01_0.wav").read_bytes() == FILES["data/01/6_01_0.wav"]


def test_fetch_local_without_digit(tmp_path):
    source = tmp_path / "source"
    (source / "01").mkdir(parents=True)
    (source / "01" / "3_01_0.wav").write_bytes(FILES["data/01/3_01_0.wav"])

    with pytest.raises(ParameterError, match="no .wav files of digit 6") as error:
        fetch_local(source, 6, tmp_path / "raw")

    assert "01/6_01_0.wav" in str(error.value)
    assert not (tmp_path / "raw").exists()
