"""The one output-dir rule (text2llm.files) that every writer uses."""

from __future__ import annotations

import pytest

from text2llm.errors import UserError
from text2llm.files import check_output_dir, read_metadata, staged_output


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_staged_output_writes_whole_and_refuses_a_non_empty_dir(tmp_path):
    out = tmp_path / "out"
    with staged_output(out) as tmp:
        assert not out.exists() and tmp.parent == tmp_path  # written beside, renamed at the end
        (tmp / "a.txt").write_text("new")
    assert (out / "a.txt").read_text() == "new" and _leftovers(tmp_path) == []
    with pytest.raises(UserError, match="not empty.*--overwrite"):
        with staged_output(out):
            pass
    with staged_output(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("newer")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"] and _leftovers(tmp_path) == []


def test_a_failed_write_leaves_the_old_output_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_output(out, overwrite=True) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_check_output_dir_and_read_metadata_messages(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="exists and is not a directory"):
        check_output_dir(f, overwrite=True)
    assert check_output_dir(tmp_path / "new", overwrite=False) == tmp_path / "new"
    with pytest.raises(UserError, match="^nothing here$"):
        read_metadata(tmp_path / "meta.json", "nothing here")
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="meta.json: not valid JSON"):
        read_metadata(tmp_path / "meta.json", "nothing here")
