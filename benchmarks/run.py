"""Benchmark the pipeline on a local copy of the recordings.

Usage (from the project root, after ``pip install -r benchmarks/requirements.txt``)::

    python benchmarks/run.py --data /path/to/AudioMNIST/data --runs 5

The script reports, for every stage and for the whole ``dvc repro
--force``, the wall time (median, minimum and maximum of ``--runs`` runs),
the CPU time (user plus system, of the process and its children) and the
peak resident memory. It measures once with a cold cache (an empty Numba
cache directory, so PaCMAP compiles its kernels) and then warm, with the
parameters of ``params.yaml``. It also times the per-file loop that analyses
like this are usually written with (``librosa.load`` at 6,800 Hz, padding to
1 s, a moving average of 5 and ``numpy.fft``) against the spectra stage run
with the same features (``ORIGINAL_FEATURES``), and checks that both produce
the same features. It prints Markdown tables on standard output.

With ``--scale`` it runs every stage once more, warm, on each of the given
larger data sets (see ``python -m audiomnist_anomalies.generate``) and
reports each stage's wall time, CPU time and peak memory per size, with the
slope of log time against log size::

    python benchmarks/run.py --data /path/to/AudioMNIST/data --runs 1 \
        --scale /data/generated-30000 /data/generated-100000
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("fetch", "spectra", "detect", "embed", "cluster", "inspect", "evaluate", "report")
BIN = Path(sys.executable).parent
# The spectra settings of the original analysis, which the librosa loop computes.
ORIGINAL_FEATURES = {"kind": "fft_magnitude", "sample_rate": 6800, "duration": 1.0, "smoothing_window": 5}


# The analysis stages, fetch through inspect, without the evaluation. Naming
# inspect and embed reproduces them and every stage they depend on.
ANALYSIS = "dvc repro --force inspect embed"
ANALYSIS_COMMAND = [str(BIN / "dvc"), "repro", "--force", "-q", "inspect", "embed"]


def measure(command: list[str], cwd: Path, environment: dict[str, str]) -> tuple[float, float, float]:
    """Run a command; return wall seconds, CPU seconds and peak memory in MB."""
    # A file, not a pipe, takes the log: a full pipe would block the stage.
    with tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        process = subprocess.Popen(
            command, cwd=cwd, env=environment, stdout=subprocess.DEVNULL, stderr=log
        )
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            message = log.read().decode(errors="replace")[-2000:]
            raise SystemExit(f"{' '.join(command)} failed:\n{message}")
    # ru_maxrss is in kilobytes on Linux and covers the largest waited-for descendant.
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def set_spectra(folder: Path, settings: dict) -> None:
    """Change keys of the ``spectra`` section of the project's ``params.yaml``."""
    import yaml

    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["spectra"].update(settings)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def make_project(folder: Path, data: Path) -> None:
    """Copy the project files into ``folder`` with ``data.source`` set, and commit."""
    import yaml

    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, folder / name)
    shutil.copytree(ROOT / "src", folder / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(ROOT / ".dvc", folder / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["data"]["source"] = str(data)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    identity = ["-c", "user.email=bench@localhost", "-c", "user.name=bench"]
    for arguments in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "benchmark copy"]):
        subprocess.run(["git", *identity, *arguments], cwd=folder, check=True)


def baseline_features(paths: list[Path]) -> np.ndarray:
    """Compute spectra the usual way: librosa.load, pad to 1 s, moving average, FFT."""
    import librosa

    rows = []
    for path in paths:
        samples, _ = librosa.load(path, sr=6800)
        samples = np.pad(samples, (0, max(0, 6800 - samples.size)))[:6800]
        samples = np.convolve(samples, np.ones(5) / 5, mode="same")
        magnitude = np.abs(np.fft.rfft(samples))
        rows.append(magnitude / magnitude.max())
    return np.vstack(rows)


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="local copy of the upstream data/ folder")
    parser.add_argument("--runs", type=int, default=5, help="warm runs per measurement (default 5)")
    parser.add_argument(
        "--scale",
        type=Path,
        nargs="*",
        default=[],
        help="larger data sets in the upstream layout to run every stage on once",
    )
    parser.add_argument(
        "--scale-only", action="store_true", help="skip the measurements on --data except the scale run"
    )
    options = parser.parse_args()
    if options.scale_only:
        scale_table(options.data, options.scale)
        return

    work = Path(tempfile.mkdtemp(prefix="audiomnist-benchmark-"))
    project = work / "project"
    project.mkdir()
    make_project(project, options.data.resolve())
    environment = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    warm_cache = work / "numba-warm"

    # Cold: every stage in a fresh interpreter with an empty Numba cache.
    cold: dict[str, tuple[float, float, float]] = {}
    cold_environment = dict(environment, NUMBA_CACHE_DIR=str(work / "numba-cold"))
    for stage in STAGES:
        cold[stage] = measure([str(BIN / "python"), "-m", f"audiomnist_anomalies.{stage}"], project, cold_environment)
    whole_cold_environment = dict(environment, NUMBA_CACHE_DIR=str(work / "numba-cold-repro"))
    cold["dvc repro --force"] = measure([str(BIN / "dvc"), "repro", "--force", "-q"], project, whole_cold_environment)
    analysis_cold_environment = dict(environment, NUMBA_CACHE_DIR=str(work / "numba-cold-analysis"))
    cold[ANALYSIS] = measure(ANALYSIS_COMMAND, project, analysis_cold_environment)

    warm_environment = dict(environment, NUMBA_CACHE_DIR=str(warm_cache))
    measure([str(BIN / "dvc"), "repro", "--force", "-q"], project, warm_environment)
    warm: dict[str, list[tuple[float, float, float]]] = {name: [] for name in (*STAGES, "dvc repro --force", ANALYSIS)}
    for _ in range(options.runs):
        for stage in STAGES:
            warm[stage].append(measure([str(BIN / "python"), "-m", f"audiomnist_anomalies.{stage}"], project, warm_environment))
        warm["dvc repro --force"].append(measure([str(BIN / "dvc"), "repro", "--force", "-q"], project, warm_environment))
        warm[ANALYSIS].append(measure(ANALYSIS_COMMAND, project, warm_environment))

    # The spectra stage again, with the features the librosa loop computes.
    set_spectra(project, ORIGINAL_FEATURES)
    spectra_command = [str(BIN / "python"), "-m", "audiomnist_anomalies.spectra"]
    original_first = measure(spectra_command, project, warm_environment)
    original_warm = [measure(spectra_command, project, warm_environment) for _ in range(options.runs)]

    import csv

    with open(project / "data/recordings.csv", newline="") as handle:
        paths = [project / "data/raw" / row["path"] for row in csv.DictReader(handle)]
    # Cold baseline: first librosa call in a fresh interpreter.
    code = (
        "import sys, time; sys.path.insert(0, %r); started = time.perf_counter(); "
        "from run import baseline_features; from pathlib import Path; "
        "baseline_features([Path(p) for p in sys.argv[1:]]); print(time.perf_counter() - started)"
    ) % str(Path(__file__).parent)
    cold_baseline = subprocess.run(
        [str(BIN / "python"), "-c", code, *map(str, paths)],
        env=dict(environment, NUMBA_CACHE_DIR=str(work / "numba-librosa")),
        capture_output=True, text=True, check=True,
    )
    baseline_times = []
    for _ in range(options.runs):
        started = time.perf_counter()
        reference = baseline_features(paths)
        baseline_times.append(time.perf_counter() - started)
    # The same work as the librosa loop, in this process: features only.
    from audiomnist_anomalies.spectra import compute_spectra

    in_process: dict[int, list[float]] = {1: [], -1: []}
    for n_jobs in in_process:
        compute_spectra(project / "data/raw", 6, 6800, 1.0, 5, n_jobs=n_jobs)
        for _ in range(options.runs):
            started = time.perf_counter()
            compute_spectra(project / "data/raw", 6, 6800, 1.0, 5, n_jobs=n_jobs)
            in_process[n_jobs].append(time.perf_counter() - started)
    ours = np.load(project / "data/spectra.npy")
    correlation = np.array([np.corrcoef(a, b)[0, 1] for a, b in zip(reference, ours)])

    versions = ", ".join(
        f"{name} {metadata.version(name)}"
        for name in ("numpy", "scipy", "soxr", "scikit-learn", "pacmap", "numba", "dvc", "librosa")
    )
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; {versions}")
    print(f"Recordings: {len(paths)}; warm runs: {options.runs}\n")
    print("| step | cold wall (s) | cold CPU (s) | cold peak memory (MB) | warm wall median (min-max) (s) | warm CPU (s) | warm peak memory (MB) |")
    print("|---|---|---|---|---|---|---|")
    for name in (*STAGES, "dvc repro --force", ANALYSIS):
        runs = warm[name]
        print(
            f"| {name} | {cold[name][0]:.2f} | {cold[name][1]:.2f} | {cold[name][2]:.0f} | "
            f"{summary([run[0] for run in runs])} | {statistics.median(run[1] for run in runs):.2f} | "
            f"{max(run[2] for run in runs):.0f} |"
        )
    spectra_warm = statistics.median(run[0] for run in original_warm)
    print()
    print("FFT magnitude at 6,800 Hz, as the librosa loop computes it:\n")
    print("| features for all recordings | cold (s) | warm median (min-max) (s) |")
    print("|---|---|---|")
    print(f"| librosa loop | {float(cold_baseline.stdout.strip()):.2f} | {summary(baseline_times)} |")
    print(f"| spectra stage (whole process) | {original_first[0]:.2f} | {summary([run[0] for run in original_warm])} |")
    print(f"| compute_spectra in process, 1 process | | {summary(in_process[1])} |")
    print(f"| compute_spectra in process, every core | | {summary(in_process[-1])} |")
    print(f"\nWarm ratio librosa loop / spectra stage: {statistics.median(baseline_times) / spectra_warm:.2f}")
    print(
        "Warm ratio librosa loop / compute_spectra in process: "
        f"{statistics.median(baseline_times) / statistics.median(in_process[1]):.2f} (1 process), "
        f"{statistics.median(baseline_times) / statistics.median(in_process[-1]):.2f} (every core)"
    )
    print(
        f"Per-recording correlation of the two spectra: minimum {correlation.min():.4f}, "
        f"median {np.median(correlation):.4f}"
    )
    shutil.rmtree(work, ignore_errors=True)
    if options.scale:
        # A fresh process: a child forked from this one, which now holds the
        # baseline's arrays, would report this process's memory as its peak.
        subprocess.run(
            [sys.executable, __file__, "--data", str(options.data), "--scale-only", "--scale",
             *map(str, options.scale)],
            check=True,
        )


SCALE_STAGES = ("fetch", "spectra", "detect", "embed", "cluster", "inspect", "evaluate")


def scale_table(data: Path, folders: list[Path]) -> None:
    """Run every stage once on each data set and print times, memory and growth."""
    work = Path(tempfile.mkdtemp(prefix="audiomnist-scale-"))
    environment = dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
        NUMBA_CACHE_DIR=str(work / "numba"),
    )
    sizes: list[int] = []
    results: list[dict[str, tuple[float, float, float]]] = []
    for folder in [data, *folders]:
        project = work / "project"
        project.mkdir()
        make_project(project, folder.resolve())
        # A first run of the map compiles PaCMAP's kernels into the shared cache.
        if not results:
            for stage in SCALE_STAGES:
                measure([str(BIN / "python"), "-m", f"audiomnist_anomalies.{stage}"], project, environment)
        measured = {}
        for stage in SCALE_STAGES:
            measured[stage] = measure(
                [str(BIN / "python"), "-m", f"audiomnist_anomalies.{stage}"], project, environment
            )
            print(f"{folder.name}: {stage} {measured[stage][0]:.1f} s, {measured[stage][2]:.0f} MB", flush=True)
        with open(project / "data/recordings.csv", newline="") as handle:
            sizes.append(sum(1 for _ in handle) - 1)
        results.append(measured)
        shutil.rmtree(project)
    print()
    header = " | ".join(f"{size:,} recordings: wall (s), CPU (s), peak (MB)" for size in sizes)
    print(f"| stage | {header} | slope of log time on log size |")
    print("|---|" + "---|" * (len(sizes) + 1))
    for values in results:
        values["all stages"] = (
            sum(values[name][0] for name in SCALE_STAGES),
            sum(values[name][1] for name in SCALE_STAGES),
            max(values[name][2] for name in SCALE_STAGES),
        )
    for stage in (*SCALE_STAGES, "all stages"):
        rows = [values[stage] for values in results]
        slope = np.polyfit(np.log(sizes), np.log([row[0] for row in rows]), 1)[0] if len(sizes) > 1 else float("nan")
        cells = " | ".join(f"{wall:.1f}, {cpu:.1f}, {peak:.0f}" for wall, cpu, peak in rows)
        print(f"| {stage} | {cells} | {slope:.2f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
