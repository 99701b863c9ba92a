"""Files every stage writes or reads the same way: output dirs and small metadata JSON files.

Output dirs. Every command that writes a dir (``clean``, ``tokenizer train``, ``pack``, ``run``,
``compress``, ``export``, ``import``) follows one rule, implemented once here:

- a dir that exists and is not empty is refused unless ``--overwrite`` (one line, exit 2);
- the new output is written into a staging dir beside it (``.NAME.partial-PID``) and renamed
  into place only when complete; the old output is moved aside first and deleted last, so a
  crash or an error at any moment leaves the old output whole, never half of the new one.

The training run dir is the exception that proves it: it is written in place (it holds
checkpoints that ``--resume`` continues), so the trainer uses :func:`check_output_dir` and
:func:`clear_dir` only.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from text2llm.errors import UserError

OVERWRITE_HINT = "pass --overwrite to replace it"


def check_output_dir(path: str | Path, overwrite: bool, hint: str = OVERWRITE_HINT) -> Path:
    """``path`` as a Path; a :class:`UserError` if it is a file, or a non-empty dir without ``overwrite``."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: output dir is not empty ({hint})")
    return out


@contextmanager
def staged_output(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Write a dir atomically: ``with staged_output(out, overwrite) as tmp: <write into tmp>``.

    Checks ``path`` (:func:`check_output_dir`), yields a fresh staging dir beside it, and on a
    clean exit swaps it in for ``path``; on an exception the staging dir is removed and ``path``
    is left as it was.
    """
    out = Path(path)
    staging = begin_staging(out, overwrite)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    swap_in(staging, out)


def begin_staging(path: str | Path, overwrite: bool) -> Path:
    """Check ``path`` (:func:`check_output_dir`) and return a fresh, empty staging dir beside it.
    (:func:`staged_output` is the usual way in; a long job that manages its own cleanup calls this
    and :func:`swap_in` itself.)"""
    out = check_output_dir(path, overwrite)
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as e:
        raise UserError(f"{out}: cannot create output dir ({e.strerror})") from None
    return staging


def swap_in(staging: Path, out: Path) -> None:
    """Replace ``out`` by ``staging`` with two renames (the old output is kept until the new one is whole)."""
    old = None
    if out.exists() or out.is_symlink():
        old = out.resolve().parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def clear_dir(path: Path) -> None:
    """Empty ``path`` (created if missing) — for the in-place run dir after ``--overwrite``."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def fsync_path(path: Path) -> None:
    """Flush a file or dir to disk where the OS allows it (a no-op where it does not)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_metadata(path: str | Path, missing: str) -> dict:
    """The JSON object in ``path``; a :class:`UserError` when it is absent (message ``missing``) or not JSON.

    For the small metadata files stages hand to each other (``meta.json``,
    ``text2llm-tokenizer.json``, ``text2llm-onnx.json``, ``text2llm-aot.json``).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(missing)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
