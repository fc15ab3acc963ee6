"""Write stage outputs atomically and reproducibly.

Every writer puts the content in a temporary file next to the target and
renames it into place, so a stage killed at any moment leaves each output
either complete or absent; temporaries that a killed run left behind are
removed by the next write. Figures carry package versions but no time
stamp in their metadata, so the same data and packages give the same bytes.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .errors import PipelineError


def remove_stale_temporaries(target: Path) -> None:
    """Delete temporary files or folders that a killed run left beside ``target``."""
    for stale in target.parent.glob(f".{target.name}.*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def package_versions() -> dict[str, str]:
    """Return the versions of Python and the packages that shape the outputs."""
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in (
        "audiomnist-anomalies",
        "numpy",
        "scipy",
        "scikit-learn",
        "pacmap",
        "numba",
        "faiss-cpu",
        "matplotlib",
        "joblib",
    ):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path that replaces ``target`` when the block succeeds.

    The temporary file lives in the target's folder, so the final
    ``os.replace`` is a rename within one file system. On any exception the
    temporary file is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    handle, name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent
    )
    os.close(handle)
    temporary = Path(name)
    # mkstemp creates the file readable by its owner only; give the output the
    # permissions an ordinary new file gets, so others can read shared results.
    os.chmod(temporary, 0o666 & ~_umask())
    try:
        yield temporary
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(target: Path | str) -> Iterator[Path]:
    """Yield a temporary folder that replaces the folder ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(temporary, 0o777 & ~_umask())
    try:
        yield temporary
        if target.exists():
            shutil.rmtree(target)
        os.replace(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def write_bytes(target: Path | str, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as temporary:
        temporary.write_bytes(data)


def write_text(target: Path | str, text: str) -> None:
    """Write UTF-8 ``text`` with Unix line ends to ``target`` atomically."""
    write_bytes(target, text.encode("utf-8"))


def write_json(target: Path | str, value: Any) -> None:
    """Write ``value`` as indented JSON with sorted keys, atomically."""
    write_text(target, json.dumps(value, indent=2, sort_keys=True) + "\n")


def write_npy(target: Path | str, array: np.ndarray) -> None:
    """Save ``array`` in NumPy ``.npy`` format (no pickled objects), atomically."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    write_bytes(target, buffer.getvalue())


# The stage that writes each .npy file, named in the advice for a damaged one.
PRODUCED_BY = {
    "spectra.npy": "spectra",
    "frequencies.npy": "spectra",
    "errors.npy": "detect",
    "pca_reconstruction.npy": "detect",
}


def load_npy(path: Path | str, mmap: bool = False) -> np.ndarray:
    """Load a ``.npy`` file without ever unpickling objects.

    With ``mmap`` the array is a read-only memory map: rows are read from
    the file when they are used.

    Raises
    ------
    PipelineError
        If the file is damaged, for example cut short.
    """
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (ValueError, EOFError) as error:
        reason = str(error)
        with open(path, "rb") as handle:
            if handle.read(6) != b"\x93NUMPY":
                # NumPy takes any file without its magic bytes for a pickle.
                reason = "not a NumPy .npy file"
        command = "dvc repro --force"
        if Path(path).name in PRODUCED_BY:
            command += f" {PRODUCED_BY[Path(path).name]}"
        raise PipelineError(
            f"{path} is damaged ({reason}); recreate it with {command}, "
            "or restore it with dvc checkout"
        ) from None


def row_batches(array: np.ndarray, size: int = 4096) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, rows)`` of a matrix in batches, each copied into memory.

    For a memory map, each batch is read with ordinary file reads instead of
    through the map, so the pages read do not stay resident in the process
    and its memory does not grow with the number of rows.
    """
    filename = getattr(array, "filename", None)
    if filename is None or not isinstance(array, np.memmap):
        for start in range(0, array.shape[0], size):
            yield start, np.asarray(array[start : start + size])
        return
    row_bytes = array.dtype.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
    with open(filename, "rb") as handle:
        for start in range(0, array.shape[0], size):
            count = min(size, array.shape[0] - start)
            handle.seek(array.offset + start * row_bytes)
            rows = np.fromfile(handle, dtype=array.dtype, count=count * row_bytes // array.dtype.itemsize)
            yield start, rows.reshape((count,) + array.shape[1:])


def take_rows(array: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Return ``array[indices]`` as an in-memory copy.

    For a memory map, the rows are read with ordinary file reads: gathering
    rows through the map would leave the pages around each row resident (the
    kernel maps neighbouring pages too), so the process's memory would grow
    with the file rather than with the rows taken.
    """
    filename = getattr(array, "filename", None)
    if filename is None or not isinstance(array, np.memmap):
        return np.asarray(array[indices])
    row_items = int(np.prod(array.shape[1:], dtype=np.int64))
    row_bytes = array.dtype.itemsize * row_items
    rows = np.empty((len(indices),) + array.shape[1:], dtype=array.dtype)
    with open(filename, "rb") as handle:
        for position, index in enumerate(indices):
            handle.seek(array.offset + int(index) * row_bytes)
            rows[position] = np.fromfile(handle, dtype=array.dtype, count=row_items).reshape(
                array.shape[1:]
            )
    return rows


class RowWriter:
    """Stream rows of a float32 matrix into a ``.npy`` file, atomically.

    Rows are appended to a temporary file next to the target; `finish` writes
    the target, ``.npy`` header first, once the row count is known, so the
    matrix is never whole in memory and the target appears only complete.
    Without a target the rows are collected in memory instead.
    """

    def __init__(self, target: Path | str | None, n_columns: int):
        self.target = Path(target) if target is not None else None
        self.n_columns = n_columns
        self.rows: list[np.ndarray] = []
        self.count = 0
        self._rows_path: Path | None = None
        self._handle: Any = None

    def __enter__(self) -> "RowWriter":
        if self.target is not None:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            # Named apart from the target's temporaries, which `atomic_path` removes.
            rows_name = self.target.with_name(self.target.stem + "-rows")
            remove_stale_temporaries(rows_name)
            handle, name = tempfile.mkstemp(
                prefix=f".{rows_name.name}.", suffix=".tmp", dir=self.target.parent
            )
            self._rows_path = Path(name)
            self._handle = os.fdopen(handle, "wb")
        return self

    def append(self, rows: np.ndarray) -> None:
        """Add a batch of rows, shape ``(k, n_columns)``, or one row, shape ``(n_columns,)``."""
        rows = np.ascontiguousarray(rows, dtype="<f4").reshape(-1, self.n_columns)
        if self._handle is None:
            self.rows.append(rows)
        else:
            self._handle.write(rows.tobytes())
        self.count += rows.shape[0]

    def finish(self) -> np.ndarray:
        """Return all rows: a read-only memory map of the target when streaming.

        Nothing is written when there are no rows.
        """
        if self._handle is None or self.count == 0:
            if not self.rows:
                return np.zeros((0, self.n_columns), dtype=np.float32)
            return np.vstack(self.rows)
        self._handle.close()
        header = {"descr": "<f4", "fortran_order": False, "shape": (self.count, self.n_columns)}
        with atomic_path(self.target) as temporary:
            with open(temporary, "wb") as output, open(self._rows_path, "rb") as rows:
                np.lib.format.write_array_header_1_0(output, header)
                shutil.copyfileobj(rows, output, 1 << 22)
        return load_npy(self.target, mmap=True)

    def __exit__(self, *exc_info: Any) -> None:
        if self._handle is not None:
            self._handle.close()
            self._rows_path.unlink(missing_ok=True)


def format_value(value: Any) -> str:
    """Format one CSV cell: shortest round-trip text for floats, '' for None/NaN."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            return ""
        return repr(float(value))
    return str(value)


def write_csv(
    target: Path | str, header: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    """Write rows under ``header`` as CSV with ``\\n`` line ends, atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([format_value(value) for value in row])
    write_text(target, buffer.getvalue())


def read_csv(path: Path | str) -> list[dict[str, str]]:
    """Read a CSV file written by `write_csv` into a list of row mappings."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def save_figure(figure: Any, target: Path | str, dpi: int = 110) -> None:
    """Save a Matplotlib figure as PNG, with package versions and no time stamp.

    The PNG text chunk ``Software`` lists the versions from `package_versions`.
    """
    import matplotlib.pyplot as plt

    software = ", ".join(f"{name} {version}" for name, version in package_versions().items())
    with atomic_path(target, suffix=".png") as temporary:
        figure.savefig(temporary, format="png", dpi=dpi, metadata={"Software": software})
    plt.close(figure)


def write_wav(target: Path | str, signal: np.ndarray, sample_rate: int) -> None:
    """Write a mono float signal as 16-bit PCM WAV, scaled only if it would clip."""
    import wave

    signal = np.asarray(signal, dtype=np.float64)
    peak = float(np.max(np.abs(signal))) if signal.size else 0.0
    if peak > 1.0:
        signal = signal / peak
    samples = np.round(signal * 32767.0).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as output:
        output.setnchannels(1)
        output.setsampwidth(2)
        output.setframerate(sample_rate)
        output.writeframes(samples.tobytes())
    write_bytes(target, buffer.getvalue())
