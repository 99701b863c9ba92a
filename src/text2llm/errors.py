"""One exception type for mistakes a user can fix, and the one check for a missing optional extra.

Stage code raises :class:`UserError` with a one-line message naming the file (and line) and
what is wrong; the CLI prints it as ``error: <message>`` and exits with status 2, never with a
traceback. Anything else is a bug and keeps its traceback.

A verb that needs a package from an optional extra calls :func:`require` before it imports it,
so a base install (``make demo``) gets one line naming what to install instead of a
``ModuleNotFoundError`` from deep inside::

    error: text2llm export onnx needs the 'export' extra: pip install 'text2llm[export]'
"""

from __future__ import annotations

import importlib.util


class UserError(Exception):
    """A bad input, path or setting. The message is shown to the user as-is, on one line."""


def require(modules: str | tuple[str, ...], extra: str, verb: str) -> None:
    """A :class:`UserError` naming ``extra`` unless every module in ``modules`` can be imported.

    ``modules`` are top-level import names (``"onnxscript"``, ``("gguf",)``); ``verb`` is what
    needs them, as the user typed it (``"export onnx"``). Nothing is imported here.
    """
    names = (modules,) if isinstance(modules, str) else modules
    if any(_find(m) is None for m in names):
        raise UserError(f"text2llm {verb} needs the '{extra}' extra: pip install 'text2llm[{extra}]'")


def _find(module: str):
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a broken install, or a module set to None in sys.modules
        return None
