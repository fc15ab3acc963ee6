"""Load ``params.yaml`` and validate every value before a stage does any work.

Each key has one ``Spec``: its type, its allowed range and a short
description. ``load_params`` rejects wrong types, out-of-range values,
unknown or misspelled keys and missing keys with a `ParameterError` that
names the key, the value received and what is allowed.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import ParameterError

DEFAULT_PARAMS_PATH = Path("params.yaml")
GITHUB_SOURCE = re.compile(
    r"^github:(?P<repo>[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+)@(?P<commit>[0-9a-f]{40})$"
)


@dataclass(frozen=True)
class Spec:
    """Type and range of one parameter.

    ``kind`` ``float`` accepts integers too and converts them. ``check``
    returns ``None`` for a valid value, or else the text that completes the
    sentence "expected ..." in the error message.
    """

    kind: type | tuple[type, ...]
    check: Callable[[Any], str | None]
    default: Any
    description: str


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_range(low: int, high: int | None = None) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not isinstance(value, int) or isinstance(value, bool):
            return f"an integer >= {low}" + (f" and <= {high}" if high else "")
        if value < low or (high is not None and value > high):
            return f"an integer >= {low}" + (f" and <= {high}" if high else "")
        return None

    return check


def _float_open_closed(
    low: float, high: float, low_open: bool = True, high_open: bool = False
) -> Callable[[Any], str | None]:
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    text = f"a number in {left}{low:g}, {high:g}{right}"

    def check(value: Any) -> str | None:
        if not _is_number(value) or not math.isfinite(value):
            return text
        if value < low or value > high:
            return text
        if (low_open and value == low) or (high_open and value == high):
            return text
        return None

    return check


def _positive_number(value: Any) -> str | None:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        return "a positive number"
    return None


def _choice(*options: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value not in options:
            return "one of " + ", ".join(repr(option) for option in options)
        return None

    return check


def _layers(value: Any) -> str | None:
    text = "a non-empty list of layer widths, whole numbers from 1 to 100000"
    if not isinstance(value, list) or not value:
        return text
    for width in value:
        if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= 100_000:
            return text
    return None


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def _source(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return (
            "'github:OWNER/REPO@COMMIT' (40 hex digits) or the path of a local "
            "folder in the upstream data/ layout"
        )
    if value.startswith("github:") and not GITHUB_SOURCE.match(value):
        return "'github:OWNER/REPO@COMMIT' with the full 40-digit commit hash"
    return None


def _url(value: Any) -> str | None:
    if not isinstance(value, str) or not re.match(r"^https?://[^\s/]+", value):
        return "an http:// or https:// URL"
    return None


def _dask_address(value: Any) -> str | None:
    text = (
        "empty, or a Dask scheduler address such as tcp://127.0.0.1:8786 (port 1-65535; "
        "tls:// is not supported because it needs certificates that cannot be set here)"
    )
    if not isinstance(value, str):
        return text
    match = re.match(r"^tcp://[^\s/]+:(\d{1,5})$", value)
    if value and not (match and 1 <= int(match[1]) <= 65535):
        return text
    return None


def _n_jobs(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not (
        value == -1 or 1 <= value <= 512
    ):
        return "-1 (every core) or a whole number of processes from 1 to 512"
    return None


def _pca_components(value: Any) -> str | None:
    text = (
        "a fraction of variance to keep in (0, 1), or a whole number of "
        "components >= 1"
    )
    if isinstance(value, bool) or not _is_number(value) or not math.isfinite(value):
        return text
    if isinstance(value, int):
        return None if value >= 1 else text
    return None if 0 < value < 1 else text


def _band_edges(value: Any) -> str | None:
    text = "a list of at least two increasing frequencies in Hz, starting at 0"
    if not isinstance(value, list) or len(value) < 2:
        return text
    if not all(_is_number(edge) and math.isfinite(edge) for edge in value):
        return text
    if value[0] != 0 or any(b <= a for a, b in zip(value, value[1:])):
        return text
    return None


DEFECT_NAMES = (
    "noise",
    "hum",
    "clipping",
    "low_pass",
    "high_pass",
    "cut_off",
    "reversed",
    "speed",
    "near_silence",
    "dc_offset",
    "second_voice",
)


def _defect_names(value: Any) -> str | None:
    text = "a non-empty list of distinct names from " + ", ".join(DEFECT_NAMES)
    if not isinstance(value, list) or not value or len(set(map(str, value))) != len(value):
        return text
    if any(name not in DEFECT_NAMES for name in value):
        return text
    return None


SCHEMA: dict[str, dict[str, Spec]] = {
    "data": {
        "source": Spec(
            str,
            _source,
            "github:soerenab/AudioMNIST@630d7dab4c040882834de6fa21baf9a60372accd",
            "where recordings come from: github:OWNER/REPO@COMMIT or a local "
            "folder in the upstream data/ layout",
        ),
        "digit": Spec(int, _int_range(0, 9), 6, "spoken digit to analyse"),
        "api_url": Spec(str, _url, "https://api.github.com", "GitHub API base URL"),
        "raw_url": Spec(
            str,
            _url,
            "https://raw.githubusercontent.com",
            "base URL of raw repository files",
        ),
        "retries": Spec(int, _int_range(0, 20), 4, "retries per HTTP request"),
        "timeout": Spec(
            float, _positive_number, 15, "HTTP timeout in seconds"
        ),
        "workers": Spec(int, _int_range(1, 64), 8, "parallel downloads"),
    },
    "spectra": {
        "sample_rate": Spec(
            int, _int_range(100, 192_000), 16_000, "analysis sample rate in Hz"
        ),
        "duration": Spec(
            float,
            _float_open_closed(0, 60),
            1.0,
            "analysis window in seconds (pad or trim)",
        ),
        "smoothing_window": Spec(
            int,
            _int_range(1, 10_000),
            5,
            "moving-average length in samples (1 turns smoothing off)",
        ),
        "kind": Spec(
            str,
            _choice("fft_magnitude", "log_bands", "log_tf"),
            "log_tf",
            "feature kind",
        ),
        "n_bands": Spec(int, _int_range(2, 1000), 48, "log-spaced bands of the log kinds"),
        "n_frames": Spec(int, _int_range(1, 1000), 32, "time frames of log_tf"),
        "min_frequency_hz": Spec(float, _positive_number, 50.0, "lowest band edge in Hz"),
        "max_frequency_hz": Spec(
            float, _positive_number, 7000.0, "highest band edge in Hz, at most half the sample rate"
        ),
        "floor_db": Spec(
            float, _float_open_closed(-200, 0, low_open=False, high_open=True), -100.0,
            "lowest level in dB relative to the total power",
        ),
    },
    "compute": {
        "n_jobs": Spec(int, _n_jobs, -1, "processes of the spectra stage (-1: every core)"),
        "dask_scheduler": Spec(
            str, _dask_address, "", "Dask scheduler that runs the spectra stage instead"
        ),
        "max_fit_recordings": Spec(
            int,
            _int_range(100, 10_000_000),
            10_000,
            "recordings sampled to fit each model when there are more",
        ),
    },
    "detect": {
        "test_size": Spec(
            float,
            _float_open_closed(0, 0.9, low_open=False, high_open=False),
            0.1,
            "fraction of recordings held out from fitting",
        ),
        "random_state": Spec(int, _int_range(0, 2**32 - 1), 42, "seed"),
        "contamination": Spec(
            float,
            _float_open_closed(0, 0.5),
            0.1,
            "expected fraction of anomalies, used for the flags",
        ),
        "pca_components": Spec(
            (int, float), _pca_components, 0.5, "variance fraction or count"
        ),
        "n_estimators": Spec(
            int, _int_range(1, 10_000), 100, "Isolation Forest trees"
        ),
        "standardize": Spec(
            bool, _boolean, True, "scale each feature by its training mean and spread"
        ),
        "reconstruction": Spec(
            str, _choice("pca", "autoencoder"), "pca", "reconstruction model"
        ),
        "autoencoder_layers": Spec(
            list, _layers, [256, 32, 256], "hidden layer widths of the autoencoder"
        ),
        "autoencoder_epochs": Spec(
            int, _int_range(1, 10_000), 200, "maximum training epochs of the autoencoder"
        ),
    },
    "embed": {
        "n_neighbors": Spec(int, _int_range(1, 1000), 10, "PaCMAP neighbours"),
        "mn_ratio": Spec(
            float, _float_open_closed(0, 100, low_open=False), 0.5, "PaCMAP"
        ),
        "fp_ratio": Spec(
            float, _float_open_closed(0, 100, low_open=False), 2.0, "PaCMAP"
        ),
        "random_state": Spec(int, _int_range(0, 2**31 - 1), 42, "seed"),
    },
    "cluster": {
        "n_neighbors": Spec(int, _int_range(1, 1000), 10, "PaCMAP neighbours"),
        "mn_ratio": Spec(
            float, _float_open_closed(0, 100, low_open=False), 0.5, "PaCMAP"
        ),
        "fp_ratio": Spec(
            float, _float_open_closed(0, 100, low_open=False), 2.0, "PaCMAP"
        ),
        "n_clusters": Spec(int, _int_range(1, 1000), 10, "k-means clusters"),
        "random_state": Spec(int, _int_range(0, 2**31 - 1), 42, "seed"),
        "band_edges_hz": Spec(
            list,
            _band_edges,
            [0, 120, 250, 500, 1000, 2000, 4000],
            "frequency bands for naming each error profile",
        ),
    },
    "evaluate": {
        "fraction": Spec(
            float,
            _float_open_closed(0, 0.5),
            0.05,
            "share of recordings to corrupt with known defects",
        ),
        "random_state": Spec(int, _int_range(0, 2**32 - 1), 42, "seed"),
        "defects": Spec(list, _defect_names, list(DEFECT_NAMES), "defect types to plant"),
        "noise_snr_db": Spec(float, _float_open_closed(-30, 60, low_open=False), 10.0, "dB"),
        "hum_frequency_hz": Spec(int, _choice(50, 60), 50, "mains frequency in Hz"),
        "hum_snr_db": Spec(float, _float_open_closed(-30, 60, low_open=False), 0.0, "dB"),
        "clipping_level": Spec(
            float, _float_open_closed(0, 1, high_open=True), 0.1, "clip level / peak"
        ),
        # Below half of the lowest sample rate a recording may have (4000 Hz),
        # so the filter is defined for every recording.
        "low_pass_hz": Spec(float, _float_open_closed(0, 2000, high_open=True), 500.0, "cut-off in Hz"),
        "high_pass_hz": Spec(float, _float_open_closed(0, 2000, high_open=True), 1500.0, "cut-off in Hz"),
        "cut_off_keep": Spec(
            float, _float_open_closed(0, 1, high_open=True), 0.4, "share kept"
        ),
        "speed_factor": Spec(float, _float_open_closed(0.25, 4), 1.3, "playback speed"),
        "near_silence_db": Spec(
            float, _float_open_closed(-120, 0, low_open=False, high_open=True), -50.0, "dB"
        ),
        "dc_offset": Spec(float, _float_open_closed(0, 1), 0.3, "offset / peak"),
        "second_voice_db": Spec(
            float, _float_open_closed(-30, 30, low_open=False), 0.0, "dB"
        ),
    },
    "inspect": {
        "top_n": Spec(int, _int_range(0, 1000), 10, "anomalies to draw"),
        "rank_by": Spec(
            str,
            _choice("reconstruction_error", "isolation_forest"),
            "reconstruction_error",
            "score that orders the anomalies",
        ),
    },
}


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    if close:
        return f" Did you mean '{close[0]}'?"
    return " Known keys: " + ", ".join(sorted(options)) + "."


def validate_params(raw: Any, source: str = "params.yaml") -> dict[str, dict[str, Any]]:
    """Check a parsed parameter mapping against ``SCHEMA``.

    Parameters
    ----------
    raw : Any
        The parsed YAML document.
    source : str
        File name used in error messages.

    Returns
    -------
    dict
        The same values, grouped by section, with integers given for float
        parameters converted to float.

    Raises
    ------
    ParameterError
        On the first missing, unknown, wrongly typed or out-of-range key.
    """
    if not isinstance(raw, dict):
        raise ParameterError(
            f"{source}: expected a mapping of sections ({', '.join(SCHEMA)}), "
            f"got {type(raw).__name__}."
        )
    for section in raw:
        if section not in SCHEMA:
            raise ParameterError(
                f"{source}: unknown section '{section}'."
                + _suggest(str(section), list(SCHEMA))
            )
    params: dict[str, dict[str, Any]] = {}
    for section, specs in SCHEMA.items():
        values = raw.get(section)
        if values is None:
            raise ParameterError(
                f"{source}: missing section '{section}'. Add it with the keys "
                + ", ".join(specs)
                + "."
            )
        if not isinstance(values, dict):
            raise ParameterError(
                f"{source}: section '{section}' must be a mapping of keys, "
                f"got {values!r}."
            )
        for key in values:
            if key not in specs:
                raise ParameterError(
                    f"{source}: unknown key '{section}.{key}'."
                    + _suggest(str(key), list(specs))
                )
        params[section] = {}
        for key, spec in specs.items():
            name = f"{section}.{key}"
            if key not in values:
                raise ParameterError(
                    f"{source}: missing key '{name}' ({spec.description}). "
                    f"Add it, for example '{key}: {spec.default!r}'."
                )
            value = values[key]
            # dvc exp run -S key=1e4 stores 10000.0; a whole number is meant.
            if spec.kind is int and isinstance(value, float) and value.is_integer():
                value = int(value)
            accepted = (int, float) if spec.kind is float else spec.kind
            wrong_bool = isinstance(value, bool) != (spec.kind is bool)
            if not isinstance(value, accepted) or wrong_bool:
                problem = spec.check(object())
            else:
                problem = spec.check(value)
            if problem is not None:
                raise ParameterError(
                    f"{source}: invalid value for '{name}': {value!r} "
                    f"({type(value).__name__}); expected {problem}."
                )
            if spec.kind is float:
                value = float(value)
            params[section][key] = value
    return params


def load_params(path: Path | str = DEFAULT_PARAMS_PATH) -> dict[str, dict[str, Any]]:
    """Read and validate a ``params.yaml`` file.

    Raises
    ------
    ParameterError
        If the file is missing, is not valid YAML, or has an invalid value.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        advice = (
            "Run the stage from the project root, where params.yaml is."
            if path == Path(DEFAULT_PARAMS_PATH)
            else "Check the path."
        )
        raise ParameterError(f"parameter file not found: {path}. {advice}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ParameterError(f"cannot read parameter file {path}: {error}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ParameterError(f"{path} is not valid YAML: {error}") from None
    return validate_params(raw, source=str(path))


def default_params() -> dict[str, dict[str, Any]]:
    """Return the documented default of every parameter, grouped by section."""
    return {
        section: {key: spec.default for key, spec in specs.items()}
        for section, specs in SCHEMA.items()
    }
