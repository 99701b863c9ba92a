"""One exception type for mistakes a user can fix.

Stage code raises :class:`UserError` with a one-line message naming the file (and line) and
what is wrong; the CLI prints it as ``error: <message>`` and exits with status 2, never with a
traceback. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A bad input, path or setting. The message is shown to the user as-is, on one line."""


def read_json_file(path, missing: str):
    """The JSON object in ``path``; a :class:`UserError` when it is absent (message ``missing``) or not JSON.

    Used for the small metadata files stages hand to each other (meta.json, text2llm-tokenizer.json, ...).
    """
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise UserError(missing)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
