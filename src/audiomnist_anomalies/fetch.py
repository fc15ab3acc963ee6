"""Stage ``fetch``: put the recordings of one digit into ``data/raw``.

AudioMNIST (Becker et al. 2018, repository ``soerenab/AudioMNIST``, MIT
License) has 60 speakers x 10 digits x 50 repetitions = 30,000 WAV files
of 16-bit PCM at 48 kHz, about 1 GB, in ``data/{speaker}/{digit}_{speaker}_
{repetition}.wav``, with speaker metadata in ``data/audioMNIST_meta.txt``.
One digit is 3,000 files, about 211 MB.

The source is either ``github:OWNER/REPO@COMMIT``, from which only the
selected digit's files are downloaded, or a local folder in the upstream
``data/`` layout, which is copied. Downloads run in parallel with retries,
resume partial files with HTTP range requests, and verify every file
against its git blob hash at the pinned commit before it is accepted. The
hashes come from a manifest shipped with the package for the default
commit and digit, or else from the GitHub trees API.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import re
import shutil
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import requests
import urllib3
from tqdm import tqdm

from .cli import exit_with, run_stage
from .errors import DownloadError, ParameterError
from .metadata import METADATA_FILE
from .outputs import atomic_directory, write_text
from .params import GITHUB_SOURCE

log = logging.getLogger(__name__)

RAW_DIR = Path("data/raw")
DOWNLOAD_DIR = Path("data/.download")
CHUNK_SIZE = 1 << 16
BACKOFF_SECONDS = 0.25
# Maximum wait between two attempts, in seconds; without it, the 20th retry
# would wait 36 hours.
MAX_BACKOFF_SECONDS = 30.0
# After an interrupt or a failure, how long to give each download thread to
# stop before the stage goes on without it. A thread blocked in a read that
# waits for data.timeout ends with the process, as a daemon thread.
STOP_SECONDS = 1.0
RECORDING_NAME = re.compile(r"(?P<digit>\d)_(?P<speaker>\d+)_(?P<repetition>\d+)\.wav")
# HTTP statuses worth retrying: rate limits and server-side failures.
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class RemoteFile:
    """A file of the upstream repository at a pinned commit.

    Attributes
    ----------
    path : str
        Path inside the repository, for example ``data/01/6_01_0.wav``.
    size : int
        Size in bytes.
    git_sha1 : str
        Git blob hash: SHA-1 of ``b"blob <size>\\0"`` followed by the content.
    """

    path: str
    size: int
    git_sha1: str


def git_blob_sha1(path: Path) -> str:
    """Return the git blob hash of a file, as ``git hash-object`` prints it."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """Return the SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_selected(relative_path: str, digit: int) -> bool:
    """Tell whether an upstream ``data/`` path belongs to the download of ``digit``.

    Selected are the metadata file and ``{speaker}/{digit}_*.wav`` files.
    """
    parts = relative_path.split("/")
    if parts == [METADATA_FILE]:
        return True
    if len(parts) != 2:
        return False
    match = RECORDING_NAME.fullmatch(parts[1])
    return bool(match) and int(match["digit"]) == digit


def load_manifest(commit: str, digit: int) -> list[RemoteFile] | None:
    """Return the shipped file list for ``commit`` and ``digit``, if there is one."""
    name = f"{commit}-digit{digit}.tsv"
    manifest = resources.files("audiomnist_anomalies") / "manifests" / name
    if not manifest.is_file():
        return None
    files = []
    for line in manifest.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        path, size, git_sha1, _sha256 = line.split("\t")
        files.append(RemoteFile(path, int(size), git_sha1))
    return files


def _unsafe_path(path: str) -> bool:
    parts = path.split("/")
    return (
        path.startswith("/")
        or "\\" in path
        or any(part in ("", ".", "..") for part in parts)
    )


def select_remote_files(entries: list[dict[str, Any]], digit: int) -> list[RemoteFile]:
    """Pick the digit's blobs under ``data/`` from a git tree listing.

    Raises
    ------
    DownloadError
        If an entry has a path that could write outside the output folder,
        or the listing has no recordings of the digit.
    """
    files = []
    seen: set[str] = set()
    for entry in entries:
        path = str(entry.get("path", ""))
        if _unsafe_path(path):
            raise DownloadError(f"the repository listing has an unsafe path {path!r}")
        if entry.get("type") != "blob" or not path.startswith("data/"):
            continue
        if not is_selected(path[len("data/") :], digit):
            continue
        sha = str(entry.get("sha", ""))
        size = entry.get("size")
        if (
            not re.fullmatch(r"[0-9a-f]{40}", sha)
            or not isinstance(size, int)
            or isinstance(size, bool)
            or size < 0
        ):
            raise DownloadError(f"the repository listing has no valid hash or size for {path}")
        if path in seen:
            # Two downloads of one path would write the same partial file.
            raise DownloadError(f"the repository listing has {path} twice")
        seen.add(path)
        files.append(RemoteFile(path, size, sha))
    if not any(file.path.endswith(".wav") for file in files):
        raise DownloadError(f"the repository listing has no recordings of digit {digit}")
    return sorted(files, key=lambda file: file.path)


class Downloader:
    """HTTP client with retries, exponential back-off and resumable downloads.

    Parameters
    ----------
    retries : int
        Extra attempts after a failed request.
    timeout : float
        Connect and read timeout in seconds.
    sleep : callable, optional
        Waits between attempts; tests pass a no-op. By default the wait ends
        early when the download is cancelled.
    """

    def __init__(
        self, retries: int, timeout: float, sleep: Callable[[float], Any] | None = None
    ) -> None:
        self.retries = retries
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "audiomnist-anomalies"
        self._progress_lock = threading.Lock()
        # Set when one file has failed for good or the stage is interrupted, so
        # the other workers stop.
        self.cancelled = threading.Event()
        self.sleep = sleep or self.cancelled.wait

    def _backoff(self, attempt: int, url: str, error: Exception | None) -> None:
        if self.cancelled.is_set():
            raise DownloadError("cancelled after another file failed")
        log.warning(
            "fetch: %s failed (%s); retry %d of %d",
            url,
            error,
            attempt + 1,
            self.retries,
        )
        self.sleep(min(BACKOFF_SECONDS * 2**attempt, MAX_BACKOFF_SECONDS))
        if self.cancelled.is_set():
            raise DownloadError("cancelled after another file failed")

    def get_json(self, url: str) -> Any:
        """GET ``url`` and decode JSON, retrying transient failures."""
        headers = {"Accept": "application/vnd.github+json"}
        token = os.environ.get("GITHUB_TOKEN")
        if token:
            headers["Authorization"] = f"Bearer {token}"
        last_error: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                self._backoff(attempt - 1, url, last_error)
            try:
                response = self.session.get(url, headers=headers, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as error:
                last_error = error
                continue
            if response.status_code in RETRY_STATUSES:
                last_error = _RetryableStatus(f"HTTP {response.status_code} from {url}")
                continue
            if response.status_code != 200:
                raise DownloadError(
                    f"HTTP {response.status_code} from {url}: "
                    f"{response.text[:200].strip()}"
                )
            try:
                return response.json()
            except ValueError:
                raise DownloadError(f"the response from {url} is not JSON") from None
        attempts = f"after {self.retries + 1} attempt{'s' if self.retries else ''}"
        raise _unreachable(url, last_error, attempts)

    def download(
        self, url: str, file: RemoteFile, target: Path, progress: tqdm | None = None
    ) -> bool:
        """Download one file to ``target``, resuming ``target.part`` if present.

        The file is verified against its size and git blob hash before it is
        renamed to ``target``, so ``target`` exists only when it is correct.

        Returns
        -------
        bool
            True if bytes were transferred, False if ``target`` was already
            present and verified.

        Raises
        ------
        DownloadError
            After ``retries`` failed attempts, or at once for a missing file.
        """
        if target.exists():
            if target.stat().st_size == file.size and git_blob_sha1(target) == file.git_sha1:
                self._advance(progress, file.size)
                return False
            target.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        if partial.exists():
            self._advance(progress, min(partial.stat().st_size, file.size))
        failures = 0
        while True:
            error = self._attempt(url, file, partial, progress)
            if error is None:
                os.replace(partial, target)
                return True
            if isinstance(error, _StalePartial):
                # A part kept from an earlier run did not verify: start over at once.
                continue
            failures += 1
            if failures > self.retries:
                break
            self._backoff(failures - 1, url, error)
        attempts = f"after {failures} attempt{'s' if failures != 1 else ''}"
        if isinstance(error, DownloadError):
            raise DownloadError(f"{error} ({attempts})")
        raise _unreachable(url, error, attempts)

    def _attempt(
        self, url: str, file: RemoteFile, partial: Path, progress: tqdm | None
    ) -> Exception | None:
        """Download or resume ``partial`` once; return None when it verifies, else the error."""
        offset = partial.stat().st_size if partial.exists() else 0
        if offset > file.size:
            partial.unlink()
            self._advance(progress, -file.size)
            offset = 0
        complete = True
        try:
            if offset < file.size:
                complete = self._transfer(url, partial, offset, progress)
        except (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
            urllib3.exceptions.HTTPError,
            OSError,
            _RetryableStatus,
        ) as error:
            return error
        size = partial.stat().st_size if partial.exists() else 0
        if size < file.size and not complete:
            return DownloadError(f"{file.path}: transfer stopped at {size} of {file.size} bytes")
        if size < file.size:
            # The server completed its response, so its file is a different one.
            partial.unlink()
            self._advance(progress, -size)
            return DownloadError(
                f"{file.path}: the server's complete response has {size} bytes, the file "
                f"of the pinned commit {file.size}; check data.raw_url in params.yaml"
            )
        if size > file.size or git_blob_sha1(partial) != file.git_sha1:
            partial.unlink()
            self._advance(progress, -size)
            if offset:
                return _StalePartial()
            return DownloadError(
                f"{file.path}: content does not match the git blob hash "
                f"{file.git_sha1} of the pinned commit"
            )
        return None

    def _transfer(
        self, url: str, partial: Path, offset: int, progress: tqdm | None
    ) -> bool:
        """Append the server's bytes from ``offset`` on to ``partial``.

        Returns True when the whole response arrived, with as many bytes as
        its Content-Length header gives, and False when it ended early or has
        no Content-Length.
        """
        # Byte ranges refer to the stored file, so ask for it without compression.
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        with self.session.get(url, headers=headers, stream=True, timeout=self.timeout) as response:
            if response.status_code == 416:
                # The partial file is longer than the server's file, so start over.
                partial.unlink(missing_ok=True)
                self._advance(progress, -offset)
                raise _RetryableStatus(f"HTTP 416 from {url}")
            if response.status_code in RETRY_STATUSES:
                raise _RetryableStatus(f"HTTP {response.status_code} from {url}")
            if response.status_code == 200:
                mode = "wb"
                self._advance(progress, -offset)
            elif response.status_code == 206 and offset:
                mode = "ab"
            else:
                raise DownloadError(
                    f"HTTP {response.status_code} from {url}; check data.source and "
                    "data.raw_url in params.yaml"
                )
            # read1 returns whatever has arrived, so a dropped connection loses no
            # received bytes; iter_content would discard a partly filled chunk.
            received = 0
            with open(partial, mode) as handle:
                while True:
                    if self.cancelled.is_set():
                        # Stop between chunks; the bytes so far stay for a resume.
                        raise DownloadError("cancelled")
                    chunk = response.raw.read1(CHUNK_SIZE)
                    if not chunk:
                        break
                    handle.write(chunk)
                    received += len(chunk)
                    self._advance(progress, len(chunk))
            length = response.headers.get("Content-Length", "")
            return length.isdigit() and received == int(length)

    def _advance(self, progress: tqdm | None, count: int) -> None:
        if progress is not None and count:
            with self._progress_lock:
                progress.update(count)


class _RetryableStatus(Exception):
    """An HTTP status worth retrying, such as 503."""


class _StalePartial(Exception):
    """A resumed download did not verify, so the part kept from before was wrong."""


def _unreachable(url: str, error: Exception | None, attempts: str) -> DownloadError:
    if isinstance(error, _RetryableStatus):
        problem = f"{error} {attempts}; the server has a problem"
    elif isinstance(error, requests.Timeout):
        problem = f"{url} timed out {attempts} ({error})"
    elif _broke_off(error):
        problem = f"the connection to {url} broke off during the transfer {attempts} ({error})"
    else:
        name = type(error).__name__ if error else "no response"
        problem = f"cannot reach {url} {attempts} ({name}: {error})"
    return DownloadError(
        f"{problem}. Without network access, point data.source at a local copy of "
        "the upstream data/ folder, for example "
        "'dvc exp run -S data.source=/path/to/AudioMNIST/data' or edit params.yaml."
    )


def _broke_off(error: Exception | None) -> bool:
    """Tell whether ``error`` ended a transfer that had started, not a connection attempt."""
    if isinstance(error, requests.exceptions.ChunkedEncodingError):
        return True
    cause = error.args[0] if isinstance(error, requests.ConnectionError) and error.args else error
    return isinstance(cause, urllib3.exceptions.ProtocolError)


def list_remote_files(
    downloader: Downloader, api_url: str, repo: str, commit: str, digit: int
) -> list[RemoteFile]:
    """List the digit's files at ``commit`` with the GitHub git trees API.

    A recursive listing of the whole repository is tried first. GitHub
    truncates very large listings, and then the ``data`` folder is walked
    one speaker folder at a time.
    """
    base = f"{api_url.rstrip('/')}/repos/{repo}/git/trees"
    listing = _get_tree(downloader, f"{base}/{commit}?recursive=1")
    if not listing.get("truncated"):
        return select_remote_files(listing["tree"], digit)
    top = _get_tree(downloader, f"{base}/{commit}")
    data_tree = next(
        (entry for entry in top["tree"] if entry.get("path") == "data"), None
    )
    if data_tree is None:
        raise DownloadError(f"{repo}@{commit} has no data/ folder")
    entries = []
    for entry in _get_tree(downloader, f"{base}/{data_tree.get('sha')}")["tree"]:
        if entry.get("type") == "tree":
            speaker = _get_tree(downloader, f"{base}/{entry.get('sha')}")
            for child in speaker["tree"]:
                child = dict(child, path=f"data/{entry.get('path')}/{child.get('path', '')}")
                entries.append(child)
        else:
            entries.append(dict(entry, path=f"data/{entry.get('path', '')}"))
    return select_remote_files(entries, digit)


def _get_tree(downloader: Downloader, url: str) -> dict[str, Any]:
    """GET one git tree listing and check its shape: an object whose "tree" lists objects."""
    listing = downloader.get_json(url)
    if not isinstance(listing, dict) or not isinstance(listing.get("tree", []), list):
        raise DownloadError(
            f"the response from {url} is not a git tree listing (a JSON object with a "
            "'tree' list); check data.api_url in params.yaml"
        )
    tree = listing.setdefault("tree", [])
    for entry in tree:
        if not isinstance(entry, dict):
            raise DownloadError(
                f"the listing from {url} has an entry that is not a JSON object: {entry!r:.80}"
            )
    return listing


def write_checksums(folder: Path) -> int:
    """Write ``SHA256SUMS`` for every file under ``folder``; return the file count."""
    files = sorted(
        path for path in folder.rglob("*") if path.is_file() and path.name != "SHA256SUMS"
    )
    lines = [f"{sha256_file(path)}  {path.relative_to(folder).as_posix()}" for path in files]
    write_text(folder / "SHA256SUMS", "".join(line + "\n" for line in lines))
    return len(files)


def fetch_remote(
    repo: str,
    commit: str,
    digit: int,
    output: Path,
    *,
    api_url: str,
    raw_url: str,
    retries: int,
    timeout: float,
    workers: int,
    download_dir: Path = DOWNLOAD_DIR,
    sleep: Callable[[float], Any] | None = None,
) -> int:
    """Download and verify the digit's files, then move them to ``output``.

    Verified files and partial downloads are kept in ``download_dir``
    between runs, so an interrupted fetch resumes where it stopped.

    Returns
    -------
    int
        Number of recordings in ``output``.
    """
    downloader = Downloader(retries, timeout, sleep=sleep)
    files = load_manifest(commit, digit)
    if files is None:
        files = list_remote_files(downloader, api_url, repo, commit, digit)
    if not any(file.path == f"data/{METADATA_FILE}" for file in files):
        log.warning(
            "fetch: %s@%s has no data/%s; the analysis continues without metadata",
            repo,
            commit[:12],
            METADATA_FILE,
        )
    staging = download_dir / f"{commit}-digit{digit}"
    staging.mkdir(parents=True, exist_ok=True)
    total = sum(file.size for file in files)
    log.info(
        "fetch: %d files (%.1f MB) of digit %d from %s@%s",
        len(files),
        total / 1e6,
        digit,
        repo,
        commit[:12],
    )
    raw_base = f"{raw_url.rstrip('/')}/{repo}/{commit}"
    with tqdm(
        total=total, unit="B", unit_scale=True, desc="download", disable=None
    ) as progress:

        def fetch_one(file: RemoteFile) -> bool:
            target = staging / file.path[len("data/") :]
            return downloader.download(f"{raw_base}/{file.path}", file, target, progress)

        transferred = sum(_run_threads(fetch_one, files, workers, downloader.cancelled))
    log.info("fetch: %d files transferred, %d already verified", transferred, len(files) - transferred)
    selected = {file.path[len("data/") :] for file in files}
    with atomic_directory(output) as folder:
        for relative in sorted(selected):
            destination = folder / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(staging / relative, destination)
        write_checksums(folder)
    shutil.rmtree(staging, ignore_errors=True)
    return sum(1 for name in selected if name.endswith(".wav"))


def _run_threads(
    function: Callable[[Any], Any], items: list[Any], workers: int, cancelled: threading.Event
) -> list[Any]:
    """Return ``function(item)`` for every item, computed by ``workers`` daemon threads.

    The first error, or an interrupt in this thread, sets ``cancelled`` and
    is raised here after at most ``STOP_SECONDS`` per thread: queued items
    are not started, and running ones stop at their next check of
    ``cancelled``. The threads are daemon threads, so one that is still
    blocked in a read does not keep the process alive.
    """
    waiting: queue.SimpleQueue = queue.SimpleQueue()
    for item in items:
        waiting.put(item)
    finished: queue.SimpleQueue = queue.SimpleQueue()

    def work() -> None:
        while not cancelled.is_set():
            try:
                item = waiting.get_nowait()
            except queue.Empty:
                return
            try:
                finished.put((True, function(item)))
            except BaseException as error:  # handed to the calling thread
                finished.put((False, error))
                return

    threads = [
        threading.Thread(target=work, name=f"download-{index}", daemon=True)
        for index in range(min(workers, len(items)))
    ]
    results = []
    try:
        for thread in threads:
            thread.start()
        for _ in items:
            succeeded, value = finished.get()
            if not succeeded:
                raise value
            results.append(value)
    except BaseException:
        cancelled.set()
        for thread in threads:
            thread.join(timeout=STOP_SECONDS)
        raise
    return results


def fetch_local(source: Path, digit: int, output: Path) -> int:
    """Copy the digit's recordings and the metadata file from a local folder.

    Every ``.wav`` file below ``source`` is copied with its relative path
    unless its name marks it as a recording of another digit, so that the
    spectra stage can accept or reject each remaining file with a reason.

    Returns
    -------
    int
        Number of WAV files copied.

    Raises
    ------
    ParameterError
        If ``source`` is not a folder or contains no WAV files of the digit.
    """
    resolved, target = source.resolve(), output.resolve()
    if resolved == target or target in resolved.parents or resolved in target.parents:
        # DVC deletes data/raw before the stage runs, so a source inside it is
        # gone, and a source around it would be copied into itself.
        raise ParameterError(
            f"data.source {str(source)!r} overlaps {output}, the folder this stage "
            "writes. Give the folder the recordings were first copied or "
            "downloaded to, outside the project's data/ folder."
        )
    if not source.is_dir():
        raise ParameterError(
            f"data.source {str(source)!r} is not a folder. Give the path of a "
            "local copy of the upstream data/ folder ({speaker}/{digit}_{speaker}_"
            "{repetition}.wav and audioMNIST_meta.txt), or the default "
            "github:soerenab/AudioMNIST@<commit>."
        )
    selected = []
    other_digits = 0
    for path in sorted(source.rglob("*")):
        if path.suffix.lower() != ".wav":
            continue
        if not path.is_file():
            # A folder named like a recording, or a link to nothing.
            kind = "a folder" if path.is_dir() else "a broken link or not a regular file"
            log.warning("fetch: skipped %s: it is %s", path, kind)
            continue
        match = RECORDING_NAME.fullmatch(path.name)
        if match and int(match["digit"]) != digit:
            other_digits += 1
            continue
        selected.append(path)
    if not selected:
        raise ParameterError(
            f"data.source {str(source)!r} has no .wav files of digit {digit}; "
            "expected files such as 01/6_01_0.wav"
        )
    log.info(
        "fetch: copying %d files of digit %d from %s (%d files of other digits skipped)",
        len(selected),
        digit,
        source,
        other_digits,
    )
    with atomic_directory(output) as folder:
        for path in tqdm(selected, desc="copy", unit="file", disable=None):
            destination = folder / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, destination)
        metadata = source / METADATA_FILE
        if metadata.is_file():
            shutil.copyfile(metadata, folder / METADATA_FILE)
        else:
            log.warning("fetch: %s not found; the analysis continues without metadata", metadata)
        write_checksums(folder)
    return len(selected)


def fetch(params: dict[str, dict[str, Any]], output: Path = RAW_DIR) -> str:
    """Run the fetch stage with validated parameters; return its summary line."""
    data = params["data"]
    match = GITHUB_SOURCE.match(data["source"])
    if match:
        count = fetch_remote(
            match["repo"],
            match["commit"],
            data["digit"],
            output,
            api_url=data["api_url"],
            raw_url=data["raw_url"],
            retries=data["retries"],
            timeout=data["timeout"],
            workers=data["workers"],
        )
    else:
        count = fetch_local(Path(data["source"]).expanduser(), data["digit"], output)
    return f"{count} recordings in {output}"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point of the fetch stage."""
    return run_stage(
        "fetch",
        "Download (or copy from a local folder) the recordings of one digit "
        "into data/raw, verifying every downloaded file.",
        lambda params, options: fetch(params),
        argv,
    )


if __name__ == "__main__":
    exit_with(main())
