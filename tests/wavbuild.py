"""Build WAV files byte by byte, including malformed and unusual ones."""

from __future__ import annotations

import struct

FORMAT_PCM = 1
FORMAT_FLOAT = 3
FORMAT_EXTENSIBLE = 0xFFFE
# The GUID tail that the extensible format shares for PCM and IEEE float subtypes.
GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


def chunk(identifier: bytes, payload: bytes, size: int | None = None) -> bytes:
    """Return one RIFF chunk, padded to an even length; ``size`` overrides the header."""
    header = struct.pack("<4sI", identifier, len(payload) if size is None else size)
    return header + payload + (b"\x00" if len(payload) % 2 else b"")


def fmt_chunk(format_tag: int, channels: int, sample_rate: int, bits: int) -> bytes:
    """Return a ``fmt `` chunk; the extensible form carries the real format in its GUID."""
    block_align = channels * bits // 8
    body = struct.pack(
        "<HHIIHH", format_tag, channels, sample_rate, sample_rate * block_align, block_align, bits
    )
    if format_tag == FORMAT_EXTENSIBLE:
        subformat = FORMAT_FLOAT if bits == 64 else FORMAT_PCM
        body += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", subformat) + GUID_TAIL
    return chunk(b"fmt ", body)


def riff(chunks: list[bytes], riff_size: int | None = None) -> bytes:
    """Wrap chunks in a RIFF/WAVE header; ``riff_size`` overrides the declared size."""
    body = b"WAVE" + b"".join(chunks)
    return struct.pack("<4sI", b"RIFF", len(body) if riff_size is None else riff_size) + body


def wav_file(
    samples: bytes,
    format_tag: int = FORMAT_PCM,
    channels: int = 1,
    sample_rate: int = 48000,
    bits: int = 16,
    before: list[bytes] = (),
    after: list[bytes] = (),
    data_size: int | None = None,
) -> bytes:
    """Return a WAV file with optional extra chunks before and after ``data``."""
    return riff(
        [fmt_chunk(format_tag, channels, sample_rate, bits), *before,
         chunk(b"data", samples, data_size), *after]
    )
