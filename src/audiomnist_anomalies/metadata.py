"""Read the AudioMNIST speaker metadata file ``audioMNIST_meta.txt``.

The file is a JSON object from a two-digit speaker id to the fields
``accent``, ``age``, ``gender``, ``native speaker``, ``origin``,
``recordingdate`` and ``recordingroom``. Upstream revisions differ: ages
appear as numbers or strings, one age is implausible (1234), room names are
spelled several ways, and older revisions lack some speakers. The cleaned
columns normalize these, and the ``*_raw`` columns keep the values as found.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METADATA_FILE = "audioMNIST_meta.txt"
COLUMNS = (
    "age",
    "age_raw",
    "gender",
    "accent",
    "native_speaker",
    "origin",
    "recording_room",
    "recording_room_raw",
)
MIN_AGE = 1
MAX_AGE = 120
# Misspellings seen in upstream revisions, mapped to the majority spelling.
ROOM_SPELLINGS = {"vr-romm": "vr-room"}


def _text(value: Any) -> str:
    if value is None:
        return ""
    return str(value).strip()


def clean_age(value: Any) -> int | None:
    """Return the age in years, or ``None`` if missing or implausible."""
    text = _text(value)
    try:
        age = float(text)
    except ValueError:
        return None
    if not age.is_integer() or not MIN_AGE <= age <= MAX_AGE:
        return None
    return int(age)


def clean_room(value: Any) -> str:
    """Return the recording room in lower case with known misspellings fixed."""
    room = _text(value).lower()
    return ROOM_SPELLINGS.get(room, room)


# Fields of an upstream metadata entry that `clean_speaker` reads.
KNOWN_FIELDS = {"age", "gender", "accent", "native speaker", "origin", "recordingroom"}


def clean_speaker(fields: dict[str, Any]) -> dict[str, Any]:
    """Turn one speaker's raw metadata into the columns of ``COLUMNS``."""
    return {
        "age": clean_age(fields.get("age")),
        "age_raw": _text(fields.get("age")),
        "gender": _text(fields.get("gender")).lower(),
        "accent": _text(fields.get("accent")).lower(),
        "native_speaker": _text(fields.get("native speaker")).lower(),
        "origin": _text(fields.get("origin")),
        "recording_room": clean_room(fields.get("recordingroom")),
        "recording_room_raw": _text(fields.get("recordingroom")),
    }


def empty_speaker() -> dict[str, Any]:
    """Return the columns of a speaker without a metadata entry."""
    return {column: "" if column != "age" else None for column in COLUMNS}


def read_metadata(path: Path | str) -> dict[str, dict[str, Any]]:
    """Read the metadata file into cleaned records keyed by speaker id.

    A missing or unreadable file, or an entry that is not a mapping, is
    logged as a warning and skipped, because the recordings can still be
    analysed without metadata.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        log.warning("metadata file not found: %s; continuing without metadata", path)
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        log.warning(
            "cannot read metadata file %s (%s); continuing without metadata",
            path,
            error,
        )
        return {}
    if not isinstance(raw, dict):
        log.warning(
            "metadata file %s is not a JSON object; continuing without metadata",
            path,
        )
        return {}
    speakers = {}
    for speaker, fields in raw.items():
        if not isinstance(fields, dict):
            log.warning("metadata entry for speaker %r is not an object; skipped", speaker)
            continue
        if not KNOWN_FIELDS & set(fields):
            log.warning(
                "metadata entry for speaker %r has none of the fields %s; its "
                "metadata is left empty",
                speaker,
                ", ".join(sorted(KNOWN_FIELDS)),
            )
        speakers[str(speaker).strip().zfill(2)] = clean_speaker(fields)
    return speakers
