"""Pulls against a real HTTP server on 127.0.0.1 (tests/models/fake_hub.py) serving the
bundled model's GGUF: plain URLs and a Hugging Face repository through huggingface_hub,
resumed after dropped connections, refused when corrupt or too large, and entering the
catalog (SQLite) only when whole and readable by llama.cpp."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aicloud.models import pull_download
from aicloud.models.catalog import Catalog, CatalogEntry, CatalogError, bundled_model
from aicloud.models.pulls import (
    PARTIAL_DIR,
    PullError,
    PullProgress,
    PullRequest,
    Pulls,
    PullState,
    check_names_free,
    check_readable,
    fetch,
    install,
)
from aicloud.store import db, migrate
from tests.models.fake_hub import COMMIT, FakeHub, running, sha256

MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKEN = "hf_canary_" + "7" * 30


@pytest.fixture(scope="module")
def gguf() -> bytes:
    return bundled_model().path.read_bytes()


@pytest.fixture
def hub(gguf: bytes) -> Iterator[FakeHub]:
    files = {MODEL: gguf, "noise.gguf": os.urandom(1 << 20), "half.gguf": gguf[:len(gguf) // 2]}
    with running(FakeHub(files)) as server:
        yield server


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pull_download, "RETRY_PAUSE", 0.01)
    monkeypatch.delenv("HF_TOKEN", raising=False)


def pull(source: str, folder: Path, **fields: Any) -> tuple[Path, PullProgress]:
    request = PullRequest.create(source, **fields)
    progress = PullProgress("t", request.shown, request.model_id)
    return fetch(request, folder, progress, threading.Event()), progress


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def with_catalog(tmp_path: Path, action):  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'aicloud.db'}"
    migrate.upgrade(url)

    async def go():  # type: ignore[no-untyped-def]
        engine = db.create_engine_async(url)
        try:
            return await action(Catalog(db.session_factory(engine)))
        finally:
            await engine.dispose()

    return asyncio.run(go())


def test_https_pull_lands_whole_and_enters_the_catalog(hub: FakeHub, gguf: bytes,
                                                       tmp_path: Path) -> None:
    folder = tmp_path / "models"
    request = PullRequest.create(hub.url(MODEL), aliases=("small",), keep_alive=60.0,
                                 options={"context": 512})
    assert request.model_id == "SmolLM2-135M-Instruct.Q4_1"
    progress = PullProgress("t", request.shown, request.model_id)
    path = fetch(request, folder, progress, threading.Event())
    assert path == folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == gguf
    assert progress.sha256 == sha256(gguf)
    assert (progress.counter.done, progress.counter.total) == (len(gguf), len(gguf))
    assert leftovers(folder) == [path.name]  # no partial file, no state file

    async def enter(catalog: Catalog) -> CatalogEntry | None:
        await install(catalog, request, path)
        return await catalog.find("small")

    entry = with_catalog(tmp_path, enter)
    assert entry is not None and entry.id == request.model_id
    assert (entry.source, entry.keep_alive, dict(entry.options)) == (
        str(path), 60.0, {"context": 512})


def test_hf_pull_goes_through_the_hub_with_the_token_only_on_the_hub(
        hub: FakeHub, gguf: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.token = TOKEN
    monkeypatch.setenv("HF_ENDPOINT", hub.base_url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    path, progress = pull(f"hf://acme/tiny@{COMMIT}/{MODEL}", tmp_path, model_id="tiny")
    assert path.read_bytes() == gguf and path.name == "tiny.gguf"
    resolves = [s for s in hub.seen if f"/resolve/{COMMIT}/{MODEL}" in s.path]
    assert resolves and {s.method for s in resolves} == {"HEAD"}
    assert all(s.authorization == f"Bearer {TOKEN}" for s in resolves)
    # the bytes come from the CDN the hub redirected to, which never sees the token
    cdn = hub.gets("/cdn/")
    assert len(cdn) == 1 and cdn[0].authorization is None
    assert progress.sha256 == sha256(gguf)


def test_hf_pull_without_the_token_is_refused_by_the_hub(
        hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.token = TOKEN
    monkeypatch.setenv("HF_ENDPOINT", hub.base_url)
    with pytest.raises(PullError, match=r"the hub refused .* \(HTTP 401\)") as refused:
        pull(f"hf://acme/tiny/{MODEL}", tmp_path)
    assert TOKEN not in str(refused.value)
    hub.token = None
    with pytest.raises(PullError, match=r"HTTP 404"):
        pull("hf://acme/tiny/missing.gguf", tmp_path)
    assert hub.gets("/cdn/") == []
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed.getsockname()[1]}")
        with pytest.raises(PullError, match=r"the hub is not answering .* \(ConnectError\)"):
            pull(f"hf://acme/tiny/{MODEL}", tmp_path)


def test_the_hubs_sha256_is_checked(hub: FakeHub, gguf: bytes, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.base_url)
    hub.linked_sha = "f" * 64
    with pytest.raises(PullError, match="sha256 mismatch"):
        pull(f"hf://acme/tiny/{MODEL}", tmp_path)
    assert leftovers(tmp_path) == []
    downloads = len(hub.gets("/cdn/"))
    with pytest.raises(PullError, match="not the one the hub names"):
        pull(f"hf://acme/tiny/{MODEL}", tmp_path, sha256=sha256(gguf))
    assert len(hub.gets("/cdn/")) == downloads  # refused before downloading


def test_a_dropped_connection_is_resumed_from_where_it_broke(hub: FakeHub, gguf: bytes,
                                                             tmp_path: Path) -> None:
    cut = len(gguf) // 3
    hub.cuts = [cut]
    path, _ = pull(hub.url(MODEL), tmp_path)
    assert path.read_bytes() == gguf
    first, second = hub.gets("/files/")
    assert (first.range, first.body_bytes) == (None, cut)
    assert (second.range, second.body_bytes) == (f"bytes={cut}-", len(gguf) - cut)


def test_a_pull_that_failed_midway_is_resumed_by_the_next_one(hub: FakeHub, gguf: bytes,
                                                              tmp_path: Path) -> None:
    half = len(gguf) // 2
    hub.cuts = [half] + [0] * (pull_download.ATTEMPTS - 1)
    with pytest.raises(PullError, match="pull it again to resume"):
        pull(hub.url(MODEL), tmp_path, model_id="m")
    assert not (tmp_path / "m.gguf").exists()
    assert (tmp_path / PARTIAL_DIR / "m.gguf.part").stat().st_size == half
    hub.seen.clear()
    path, progress = pull(hub.url(MODEL), tmp_path, model_id="m")
    assert path.read_bytes() == gguf and progress.sha256 == sha256(gguf)
    assert progress.counter.resumed_from == half
    [rest] = hub.gets("/files/")
    assert (rest.range, rest.body_bytes) == (f"bytes={half}-", len(gguf) - half)


def test_a_partial_file_of_another_source_is_not_resumed(hub: FakeHub, gguf: bytes,
                                                         tmp_path: Path) -> None:
    hub.files["other.gguf"] = gguf
    hub.cuts = [1000] + [0] * (pull_download.ATTEMPTS - 1)
    with pytest.raises(PullError):
        pull(hub.url("noise.gguf"), tmp_path, model_id="m")
    hub.seen.clear()
    path, progress = pull(hub.url("other.gguf"), tmp_path, model_id="m")
    assert path.read_bytes() == gguf and progress.counter.resumed_from == 0
    assert [s.range for s in hub.gets("/files/")] == [None]


def test_corrupt_files_are_refused_and_leave_nothing(hub: FakeHub, gguf: bytes,
                                                     tmp_path: Path) -> None:
    with pytest.raises(PullError, match="sha256 mismatch"):
        pull(hub.url(MODEL), tmp_path, sha256="0" * 64)
    with pytest.raises(PullError, match="not a GGUF model"):
        pull(hub.url("noise.gguf"), tmp_path)
    # a GGUF header and metadata whose tensors run past the end of the file
    with pytest.raises(PullError, match=r"llama\.cpp cannot read the file"):
        pull(hub.url("half.gguf"), tmp_path)
    assert leftovers(tmp_path) == []


def test_check_readable_takes_the_whole_model_without_loading_weights(tmp_path: Path) -> None:
    started = time.perf_counter()
    check_readable(bundled_model().path)
    assert time.perf_counter() - started < 5  # a bound against a full load, not a timing
    with pytest.raises(PullError, match="not a GGUF"):
        check_readable(tmp_path / "missing.gguf")


def test_a_file_larger_than_the_free_disk_is_refused_before_writing(hub: FakeHub,
                                                                    tmp_path: Path) -> None:
    with pytest.raises(PullError, match=r"not enough disk space for huge\.gguf"):
        pull(hub.url("huge.gguf"), tmp_path)
    assert (tmp_path / PARTIAL_DIR / "huge.gguf.part").stat().st_size == 0
    assert not (tmp_path / "huge.gguf").exists()


def test_only_http_sources_and_redirects(hub: FakeHub, tmp_path: Path) -> None:
    for source in ("file:///etc/passwd", "ftp://host/x.gguf", "/etc/passwd", "hf://x",
                   "hf://a/b/../../c.gguf"):
        with pytest.raises(PullError):
            PullRequest.create(source)
    hub.redirects["/files/evil.gguf"] = "file:///etc/passwd"
    with pytest.raises(PullError, match="only http"):
        pull(hub.url("evil.gguf"), tmp_path)
    hub.redirects["/files/hop.gguf"] = hub.url("noise.gguf")
    with pytest.raises(PullError, match="not a GGUF"):  # a same-scheme redirect is followed
        pull(hub.url("hop.gguf"), tmp_path)
    with pytest.raises(PullError, match="HTTP 404"):
        pull(hub.url("nothing.gguf"), tmp_path)


def test_credentials_in_a_url_never_show(hub: FakeHub) -> None:
    url = hub.url(MODEL).replace("http://", "http://user:s3cret@") + "?token=s3cret"
    assert "s3cret" not in PullRequest.create(url).shown


def test_names_are_checked_before_downloading(hub: FakeHub, tmp_path: Path) -> None:
    async def scenario(catalog: Catalog) -> None:
        await catalog.add(CatalogEntry("taken", source="/m/taken.gguf", aliases=("alias",)))
        for fields in ({"model_id": "taken"}, {"model_id": "new", "aliases": ("alias",)}):
            request = PullRequest.create(hub.url(MODEL), **fields)
            with pytest.raises(CatalogError, match="already used by model taken"):
                await check_names_free(catalog, request, tmp_path / "x.gguf")
        with pytest.raises(CatalogError, match="invalid model name"):
            PullRequest.create(hub.url(MODEL), model_id="../escape")
        with pytest.raises(PullError, match="unknown weight format 'q3'"):
            PullRequest.create(hub.url(MODEL), options={"weights": "q3"})
        assert PullRequest.create(hub.url(MODEL), options={"weights": "q4_0"}).options == {
            "weights": "q4_0"}

    with_catalog(tmp_path, scenario)


async def until(condition: Callable[[], bool], within: float = 60) -> None:
    for _ in range(int(within / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the pull did not get there in time")


def test_server_pulls_show_progress_cancel_and_resume(hub: FakeHub, gguf: bytes,
                                                      tmp_path: Path) -> None:
    hub.delay = 0.002

    async def scenario(catalog: Catalog) -> None:
        pulls = Pulls(catalog, tmp_path)
        try:
            first = await pulls.start(PullRequest.create(hub.url(MODEL), model_id="slow"))
            with pytest.raises(PullError, match="already being pulled"):
                await pulls.start(PullRequest.create(hub.url(MODEL), model_id="slow"))
            await until(lambda: first.counter.done >= len(gguf) // 4)
            assert first.state is PullState.DOWNLOADING and first.counter.total == len(gguf)
            pulls.cancel(first.id)
            await until(lambda: first.state.finished)
            assert first.state is PullState.CANCELLED and await catalog.find("slow") is None
            hub.delay = 0
            second = await pulls.start(PullRequest.create(hub.url(MODEL), model_id="slow"))
            await until(lambda: second.state.finished)
            assert second.state is PullState.DONE, second.error
            assert second.counter.resumed_from >= len(gguf) // 4
            entry = await catalog.find("slow")
            assert entry is not None and entry.source == str(tmp_path / "models" / "slow.gguf")
            assert [p.id for p in pulls.items()] == [first.id, second.id]
        finally:
            await pulls.close()

    with_catalog(tmp_path, scenario)
    assert (tmp_path / "models" / "slow.gguf").read_bytes() == gguf
