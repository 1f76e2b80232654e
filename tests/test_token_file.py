"""gpupool.token_file: the one reader of a token kept in a file (or stdin), bounded."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from gpupool.token_file import MAX_BYTES, read_token_file


def read(path: str) -> str:
    return read_token_file(path, "--token-file", "tenant token")


def test_one_token_with_its_newline(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("  abc123\n")
    assert read(str(tmp_path / "t")) == "abc123"


def test_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("abc123\n"))
    assert read("-") == "abc123"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "must hold one tenant token"),
        (b"  \n\n", "must hold one tenant token"),
        (b"one\ntwo\n", "must hold one tenant token"),
        (b"one two", "must hold one tenant token"),
        (b"x" * (MAX_BYTES + 1), "must hold one tenant token"),
        (b"\xff\xfe token", "cannot read --token-file"),
    ],
    ids=["empty", "blank", "two-lines", "two-words", "oversized", "not-utf8"],
)
def test_anything_else_is_one_sentence(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "t"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as refused:
        read(str(path))
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)


def test_a_missing_or_unreadable_file(tmp_path: Path) -> None:
    for path in (tmp_path / "missing", tmp_path):
        with pytest.raises(ValueError, match=f"cannot read --token-file {path}"):
            read(str(path))
