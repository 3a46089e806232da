"""Batch input files: every kind of bad line is refused naming its line number."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from aicloud.files import FileStorage, InvalidFile, TooLarge
from aicloud.files.jsonl import parse
from aicloud.files.store import clean_filename


def line(custom_id: str = "a", url: str = "/v1/chat/completions", **extra: object) -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url,
                       "body": {"model": "m"}, **extra}).encode() + b"\n"


def test_a_good_file_parses_with_line_numbers_counting_blank_lines() -> None:
    requests = parse([line("a"), b"\n", line("b")])
    assert [(r.line, r.custom_id) for r in requests] == [(1, "a"), (3, "b")]


@pytest.mark.parametrize(("bad", "says"), [
    (b"{not json\n", "not valid JSON"),
    (b"\xff\xfe\n", "not UTF-8"),
    (b"[1, 2]\n", "JSON object"),
    (line("b", url="/v1/images"), "url must be one of"),
    (line("a"), "custom_id 'a' repeats line 1"),
    (line("b", url="/v1/embeddings"), "differs from line 1"),
    (line("", ), "custom_id must be"),
    (line("b", method="GET"), 'method must be "POST"'),
    (line("b", extra=1), "unknown field 'extra'"),
    (json.dumps({"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
                 "body": "x"}).encode(), "body must be a JSON object"),
    (json.dumps({"custom_id": "b\u0000", "method": "POST", "url": "/v1/chat/completions",
                 "body": {}}).encode(), "NUL"),
])
def test_the_first_bad_line_is_named(bad: bytes, says: str) -> None:
    with pytest.raises(InvalidFile) as caught:
        parse([line("a"), bad, line("c")])
    assert caught.value.line == 2
    assert str(caught.value).startswith("line 2: ") and says in str(caught.value)


def test_an_empty_file_is_refused() -> None:
    with pytest.raises(InvalidFile, match="no requests"):
        parse([b"\n", b"  \n"])


def test_storage_refuses_too_large_and_bad_files_leaving_nothing(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "files")
    with pytest.raises(TooLarge):
        storage.save("file-" + "0" * 24, io.BytesIO(b"x" * 2048), 1024)
    with pytest.raises(InvalidFile):
        storage.save("file-" + "1" * 24, io.BytesIO(b"{}\n"), 1024, parse)
    assert list((tmp_path / "files").iterdir()) == []
    size = storage.save("file-" + "2" * 24, io.BytesIO(line()), 1024, parse)
    assert storage.lines("file-" + "2" * 24) == [line()] and size == len(line())


def test_paths_come_from_ids_never_from_names(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    for bad in ("../etc/passwd", "file-../../x", "file-" + "a" * 23 + "/"):
        with pytest.raises(ValueError):
            storage.path(bad)
    assert clean_filename("../../etc/passwd") == "passwd"
    assert clean_filename("C:\\Users\\x\\in.jsonl") == "in.jsonl"
    assert clean_filename("a\x00b\nc.jsonl") == "abc.jsonl"
    assert clean_filename(None) == "upload.jsonl"
