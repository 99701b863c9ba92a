"""The one record type that flows through the data stage."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Document:
    """A document: a stable ``id``, its ``text`` and where it came from (``source``)."""

    id: str
    text: str
    source: str
