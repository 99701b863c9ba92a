"""Fast gzip and JSON for the data stage: what every stage spends on reading and writing shards.

* gzip through ISA-L (``python-isal``: Intel's igzip): the output is ordinary gzip that every
  reader reads, written and read several times faster than with zlib. The cleaned shards
  are written with it and every ``.gz`` input is read with it.
* JSON lines parsed with ``orjson`` (faster than :mod:`json` per line). orjson is strict
  JSON; a line it refuses (raw control characters inside strings, lone surrogate escapes,
  ``NaN``, a BOM, invalid UTF-8) is parsed again by the standard library, as leniently as
  before, so that what is accepted does not change. (orjson reads an integer past 64 bits as a
  float: the reader parses again a record whose id comes back as a float.)

What they save on the data stage is measured by benchmarks/clean.py (README, "Measured results").
"""

from __future__ import annotations

import json
from typing import IO

import orjson
from isal import igzip, isal_zlib

GzipFile = igzip.IGzipFile  # a subclass of gzip.GzipFile
# a truncated stream raises EOFError, a corrupt one IsalError or BadGzipFile (an OSError)
GZIP_CORRUPT = (EOFError, isal_zlib.error, igzip.BadGzipFile)
GZIP_ERRORS = (EOFError, OSError, isal_zlib.error)  # the above, and reading the file failed
COMPRESS_LEVEL = 1  # ISA-L levels are 0-3; 1 is as fast as 0 and ~4% smaller here


def gzip_reader(fileobj: IO[bytes]) -> IO[bytes]:
    """A binary file object of gzip data, decompressed as it is read (all members, as gzip does)."""
    return GzipFile(fileobj=fileobj, mode="rb")  # type: ignore[return-value]


def gzip_compress(data: bytes) -> bytes:
    """``data`` as one gzip member with a deterministic header (mtime 0, no file name)."""
    return igzip.compress(data, COMPRESS_LEVEL, mtime=0)


def gzip_decompress(data: bytes) -> bytes:
    """Every member of ``data`` decompressed, concatenated (raises one of :data:`GZIP_ERRORS`)."""
    return igzip.decompress(data)


_LENIENT = json.JSONDecoder(strict=False)


def lenient_loads(s: str):
    """``json.loads(s, strict=False)`` (raw control characters inside strings allowed), refusing
    a leading UTF-8 BOM as :func:`json.loads` does."""
    if s.startswith("\ufeff"):
        raise ValueError("Unexpected UTF-8 BOM")
    return _LENIENT.decode(s)


def loads(line: bytes):
    """One JSON value from UTF-8 bytes: orjson, and :func:`lenient_loads` for what orjson refuses.
    Raises ValueError (invalid UTF-8, or JSON that neither accepts)."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return lenient_loads(line.decode("utf-8"))
