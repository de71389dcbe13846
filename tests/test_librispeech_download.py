"""LibriSpeech download / verify / extract against a local HTTP server (127.0.0.1 only)."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import threading
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from edgeconformer.data import librispeech as ls
from edgeconformer.data.librispeech import (
    ChecksumMismatchError,
    DownloadError,
    UnsafeArchiveError,
    download,
    file_md5,
    prepare_librispeech,
    safe_extract,
)

FAST = {"backoff": 0.0, "progress": False}


# --------------------------------------------------------------------------- fixtures: archives


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _flac_bytes(seed: int) -> bytes:
    noise = np.random.default_rng(seed).uniform(-0.1, 0.1, 1600).astype(np.float32)  # 0.1 s at 16 kHz
    buf = io.BytesIO()
    sf.write(buf, noise, 16000, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)


def make_subset_tarball(subset: str) -> bytes:
    """A tiny archive laid out like the real ones: LibriSpeech/<subset>/<spk>/<chapter>/..."""
    chapter = f"LibriSpeech/{subset}/19/198"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for d in ("LibriSpeech", f"LibriSpeech/{subset}", f"LibriSpeech/{subset}/19", chapter):
            _add_dir(tar, d)
        _add_file(tar, "LibriSpeech/SPEAKERS.TXT", b"19 | F | train-clean-100 | 25.19 | Kara Shallenberg\n")
        _add_file(tar, f"{chapter}/19-198.trans.txt", b"19-198-0000 NORTHANGER ABBEY\n19-198-0001 THIS LITTLE WORK\n")
        _add_file(tar, f"{chapter}/19-198-0000.flac", _flac_bytes(0))
        _add_file(tar, f"{chapter}/19-198-0001.flac", _flac_bytes(1))
    return buf.getvalue()


@pytest.fixture(scope="module")
def archives() -> dict[str, bytes]:
    return {s: make_subset_tarball(s) for s in ("dev-clean", "test-clean")}


@pytest.fixture
def fake_checksums(monkeypatch, archives):
    # The test archives stand in for the real ones, so the table must carry their checksums.
    for name, data in archives.items():
        monkeypatch.setitem(ls.SUBSETS, name, ls.Subset(name, _md5(data), len(data)))


# --------------------------------------------------------------------------- fixtures: HTTP server


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    cut_after: int | None = None  # drop the connection after this many body bytes, once
    corrupt: bool = False
    ignore_range: bool = False


class RangeHandler(BaseHTTPRequestHandler):
    """Serves ServerState.files with Range support and scripted misbehaviour."""

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        state: ServerState = self.server.state  # type: ignore[attr-defined]
        range_header = self.headers.get("Range")
        state.requests.append((self.path, range_header))
        data = state.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        if state.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])

        start = 0
        if range_header and not state.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", range_header)[1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()

        if state.cut_after is not None:
            cut, state.cut_after = state.cut_after, None
            self.wfile.write(body[:cut])
            self.close_connection = True  # the client sees EOF before Content-Length bytes
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.state = ServerState()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"  # type: ignore[attr-defined]
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


# --------------------------------------------------------------------------- table


def test_subset_table_has_official_checksums_and_mirrors():
    assert set(ls.SUBSETS) == {
        "dev-clean",
        "dev-other",
        "test-clean",
        "test-other",
        "train-clean-100",
        "train-clean-360",
        "train-other-500",
    }
    assert ls.SUBSETS["dev-clean"].md5 == "42e2234ba48799c1f50f24a7926300a1"
    assert ls.SUBSETS["train-other-500"].md5 == "d1a0fd59409feb2c614ce4d30c387708"
    assert all(re.fullmatch(r"[0-9a-f]{32}", s.md5) for s in ls.SUBSETS.values())
    assert ls.subset_urls("test-other") == [
        "https://www.openslr.org/resources/12/test-other.tar.gz",
        "https://us.openslr.org/resources/12/test-other.tar.gz",
        "https://openslr.elda.org/resources/12/test-other.tar.gz",
    ]


# --------------------------------------------------------------------------- download


def test_download_verifies_and_caches_md5(server, archives, tmp_path):
    data = archives["dev-clean"]
    server.state.files["/dev-clean.tar.gz"] = data
    dest = tmp_path / "dl" / "dev-clean.tar.gz"

    out = download(f"{server.base_url}/dev-clean.tar.gz", dest, _md5(data), **{**FAST, "progress": True})

    assert out == dest and dest.read_bytes() == data
    assert not ls._part_path(dest).exists()
    assert ls._sidecar(dest).exists() and file_md5(dest) == _md5(data)


def test_download_skips_existing_verified_file_without_rehashing(server, archives, tmp_path, monkeypatch):
    data = archives["dev-clean"]
    server.state.files["/dev-clean.tar.gz"] = data
    url, dest = f"{server.base_url}/dev-clean.tar.gz", tmp_path / "dev-clean.tar.gz"
    download(url, dest, _md5(data), **FAST)
    requests_before = len(server.state.requests)

    def no_hash(path):
        raise AssertionError("md5 recomputed despite a valid cache")

    monkeypatch.setattr(ls, "_hash_file", no_hash)
    download(url, dest, _md5(data), **FAST)
    assert len(server.state.requests) == requests_before


def test_md5_cache_is_invalidated_when_the_file_changes(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"one")
    assert file_md5(path) == _md5(b"one")
    path.write_bytes(b"three")
    assert file_md5(path) == _md5(b"three")


def test_interrupted_download_resumes_with_range(server, archives, tmp_path):
    data = archives["dev-clean"]
    server.state.files["/dev-clean.tar.gz"] = data
    server.state.cut_after = 1000
    dest = tmp_path / "dev-clean.tar.gz"

    download(f"{server.base_url}/dev-clean.tar.gz", dest, _md5(data), retries=2, chunk_size=256, **FAST)

    assert dest.read_bytes() == data
    assert [r for _, r in server.state.requests] == [None, "bytes=1000-"]


def test_leftover_part_file_is_resumed(server, archives, tmp_path):
    data = archives["dev-clean"]
    server.state.files["/dev-clean.tar.gz"] = data
    dest = tmp_path / "dev-clean.tar.gz"
    ls._part_path(dest).write_bytes(data[:777])  # as left by a killed process

    download(f"{server.base_url}/dev-clean.tar.gz", dest, _md5(data), **FAST)

    assert dest.read_bytes() == data
    assert server.state.requests == [("/dev-clean.tar.gz", "bytes=777-")]


def test_server_ignoring_range_restarts_from_zero(server, archives, tmp_path):
    data = archives["dev-clean"]
    server.state.files["/dev-clean.tar.gz"] = data
    server.state.ignore_range = True
    server.state.cut_after = 1000
    dest = tmp_path / "dev-clean.tar.gz"

    download(f"{server.base_url}/dev-clean.tar.gz", dest, _md5(data), retries=2, **FAST)

    # The second request asked for a range, got the whole file with 200, and must not append it.
    assert dest.read_bytes() == data
    assert [r for _, r in server.state.requests] == [None, "bytes=1000-"]


def test_complete_part_file_answered_with_416_is_finalised(server, archives, tmp_path):
    data = archives["dev-clean"]
    server.state.files["/dev-clean.tar.gz"] = data
    dest = tmp_path / "dev-clean.tar.gz"
    ls._part_path(dest).write_bytes(data)

    download(f"{server.base_url}/dev-clean.tar.gz", dest, _md5(data), **FAST)

    assert dest.read_bytes() == data and not ls._part_path(dest).exists()
    assert server.state.requests == [("/dev-clean.tar.gz", f"bytes={len(data)}-")]


def test_checksum_mismatch_leaves_nothing_behind(server, archives, tmp_path):
    data = archives["dev-clean"]
    server.state.files["/dev-clean.tar.gz"] = data
    server.state.corrupt = True
    url, dest = f"{server.base_url}/dev-clean.tar.gz", tmp_path / "dev-clean.tar.gz"

    with pytest.raises(ChecksumMismatchError) as info:
        download(url, dest, _md5(data), **FAST)
    message = str(info.value)
    assert "dev-clean.tar.gz" in message and _md5(data) in message
    corrupted = data[:-1] + bytes([data[-1] ^ 0xFF])
    assert _md5(corrupted) in message and "run again" in message
    assert not dest.exists() and not ls._part_path(dest).exists()

    # The next try starts from scratch (no Range) and succeeds once the server is healthy.
    server.state.corrupt = False
    download(url, dest, _md5(data), **FAST)
    assert dest.read_bytes() == data
    assert server.state.requests[-1] == ("/dev-clean.tar.gz", None)


def test_retries_are_bounded(tmp_path, monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(ls.time, "sleep", sleeps.append)
    # Port 9 (discard) on loopback: nothing listens, so every attempt is refused.
    with pytest.raises(DownloadError, match="after 3 attempts"):
        download("http://127.0.0.1:9/x.tar.gz", tmp_path / "x.tar.gz", None, retries=2, backoff=0.5, progress=False)
    assert sleeps == [0.5, 1.0]  # exponential backoff


def test_http_404_is_not_retried(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        download(f"{server.base_url}/missing.tar.gz", tmp_path / "m.tar.gz", None, retries=3, **FAST)
    assert len(server.state.requests) == 1


# --------------------------------------------------------------------------- safe_extract


def _write_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for m in members:
            if isinstance(m, tuple):
                _add_file(tar, *m)
            else:
                tar.addfile(m)
    return path


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return info


@pytest.mark.parametrize(
    "evil, member_name",
    [
        (("../evil.txt", b"x"), "../evil.txt"),
        (("LibriSpeech/../../evil.txt", b"x"), "LibriSpeech/../../evil.txt"),
        ("ABSOLUTE", "ABSOLUTE"),
        (_link("LibriSpeech/out", "../../outside"), "LibriSpeech/out"),
        (_link("LibriSpeech/abs", "/etc"), "LibriSpeech/abs"),
        (_link("LibriSpeech/hard", "../evil.txt", tarfile.LNKTYPE), "LibriSpeech/hard"),
        (_device("LibriSpeech/null"), "LibriSpeech/null"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-out", "symlink-abs", "hardlink-out", "device"],
)
def test_safe_extract_refuses_unsafe_members(tmp_path, evil, member_name):
    target = tmp_path / "sandbox" / "target"
    if evil == "ABSOLUTE":
        member_name = str(tmp_path / "sandbox" / "abs-evil.txt")
        evil = (member_name, b"x")
    # A harmless member first, so a half-done extraction would be visible if it leaked.
    archive = _write_tar(tmp_path / "evil.tar.gz", [("LibriSpeech/ok.txt", b"fine"), evil])

    with pytest.raises(UnsafeArchiveError, match=re.escape(repr(member_name))):
        safe_extract(archive, target)

    assert sorted(p.name for p in (tmp_path / "sandbox").iterdir()) == ["target"]
    assert list(target.iterdir()) == []  # no temp folder, no stamp, no partial content
    assert not (tmp_path / "evil.txt").exists()


def test_safe_extract_refuses_writing_through_a_symlink(tmp_path):
    target = tmp_path / "target"
    archive = _write_tar(tmp_path / "a.tar.gz", [_link("LibriSpeech/d", "."), ("LibriSpeech/d/f.txt", b"x")])
    with pytest.raises(UnsafeArchiveError, match="through the symlink"):
        safe_extract(archive, target)
    assert list(target.iterdir()) == []


def test_safe_extract_refuses_symlink_chain_escaping(tmp_path):
    # Each link looks harmless on its own; together LibriSpeech/s2 resolves to target's parent.
    target = tmp_path / "target"
    archive = _write_tar(
        tmp_path / "a.tar.gz",
        [_link("LibriSpeech/s2", "s1/../.."), _link("LibriSpeech/s1", "."), ("LibriSpeech/ok.txt", b"x")],
    )
    with pytest.raises(UnsafeArchiveError, match="s2"):
        safe_extract(archive, target)
    assert list(target.iterdir()) == []


def test_safe_extract_allows_internal_symlink_and_stamps_once(tmp_path, monkeypatch):
    target = tmp_path / "target"
    archive = _write_tar(
        tmp_path / "dev-clean.tar.gz",
        [("LibriSpeech/dev-clean/a.txt", b"hello"), _link("LibriSpeech/alias", "dev-clean")],
    )
    safe_extract(archive, target)
    assert (target / "LibriSpeech/alias/a.txt").read_bytes() == b"hello"
    stamp = target / ".extracted-dev-clean"
    assert stamp.read_text().strip() == file_md5(archive)
    assert sorted(p.name for p in target.iterdir()) == [".extracted-dev-clean", "LibriSpeech"]

    def no_open(*args, **kwargs):
        raise AssertionError("archive opened again despite the stamp")

    monkeypatch.setattr(ls.tarfile, "open", no_open)
    safe_extract(archive, target)


# --------------------------------------------------------------------------- prepare / find


def _check_corpus(corpus: Path, subsets: list[str]) -> None:
    assert corpus.name == "LibriSpeech"
    for subset in subsets:
        chapter = corpus / subset / "19" / "198"
        assert (chapter / "19-198.trans.txt").read_text().startswith("19-198-0000 ")
        audio, rate = sf.read(chapter / "19-198-0001.flac")
        assert rate == 16000 and audio.ndim == 1 and len(audio) == 1600


def test_prepare_downloads_extracts_and_second_call_is_offline(server, archives, fake_checksums, tmp_path):
    for name, data in archives.items():
        server.state.files[f"/{name}.tar.gz"] = data
    root = tmp_path / "data"

    corpus = prepare_librispeech(["dev-clean", "test-clean"], root, base_urls=[server.base_url], **FAST)

    assert corpus == root / "LibriSpeech"
    _check_corpus(corpus, ["dev-clean", "test-clean"])
    assert (root / ".extracted-dev-clean").exists() and (root / "dev-clean.tar.gz").exists()
    assert not list(root.glob(".tmp-extract-*"))
    assert len(server.state.requests) == 2

    again = prepare_librispeech(["dev-clean", "test-clean"], root, base_urls=[server.base_url], **FAST)
    assert again == corpus and len(server.state.requests) == 2


def test_prepare_falls_back_to_the_next_mirror(server, archives, fake_checksums, tmp_path):
    server.state.files["/good/dev-clean.tar.gz"] = archives["dev-clean"]
    mirrors = [f"{server.base_url}/missing", f"{server.base_url}/good"]

    corpus = prepare_librispeech(
        ["dev-clean"], tmp_path / "LibriSpeech", download_dir=tmp_path / "dl", base_urls=mirrors, **FAST
    )

    assert corpus == tmp_path / "LibriSpeech"
    _check_corpus(corpus, ["dev-clean"])
    assert (tmp_path / "dl" / "dev-clean.tar.gz").exists()
    assert [p for p, _ in server.state.requests] == ["/missing/dev-clean.tar.gz", "/good/dev-clean.tar.gz"]


def test_prepare_reports_every_mirror_on_failure(server, archives, fake_checksums, tmp_path):
    server.state.files["/dev-clean.tar.gz"] = archives["dev-clean"]
    server.state.corrupt = True
    with pytest.raises(DownloadError, match="any mirror") as info:
        prepare_librispeech(["dev-clean"], tmp_path, base_urls=[server.base_url], **FAST)
    assert isinstance(info.value.__cause__, ChecksumMismatchError)
    assert not (tmp_path / "LibriSpeech").exists()


def test_prepare_only_fetches_missing_subsets(server, archives, fake_checksums, tmp_path):
    server.state.files["/test-clean.tar.gz"] = archives["test-clean"]
    root = tmp_path / "data"
    (root / "LibriSpeech" / "dev-clean").mkdir(parents=True)

    corpus = prepare_librispeech(["dev-clean", "test-clean"], root, base_urls=[server.base_url], **FAST)

    _check_corpus(corpus, ["test-clean"])
    assert [p for p, _ in server.state.requests] == ["/test-clean.tar.gz"]


@pytest.mark.parametrize("use_parent", [True, False])
def test_prepare_uses_existing_local_tree_without_network(tmp_path, no_network, use_parent):
    corpus = tmp_path / "corpus" / "LibriSpeech"
    for subset in ("dev-clean", "dev-other"):
        (corpus / subset / "19" / "198").mkdir(parents=True)
    root = corpus.parent if use_parent else corpus

    assert prepare_librispeech(["dev-clean", "dev-other"], root, base_urls=["http://127.0.0.1:9"]) == corpus


def test_prepare_rejects_unknown_subsets(tmp_path):
    with pytest.raises(ValueError, match="train-clean-100") as info:
        prepare_librispeech(["dev-clean", "train-clean-1000"], tmp_path)
    assert "train-clean-1000" in str(info.value)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # 3.12+ warns about unfiltered extraction
def test_own_checks_hold_without_tarfile_filters(tmp_path, monkeypatch):
    # Pythons before 3.10.12 / 3.11.4 have no extraction filters: the same archives must still fail.
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    target = tmp_path / "sandbox" / "target"
    cases = {
        "LibriSpeech/out": [_link("LibriSpeech/out", "../../outside")],
        "LibriSpeech/s2": [_link("LibriSpeech/s2", "s1/../.."), _link("LibriSpeech/s1", ".")],
        "../evil.txt": [("../evil.txt", b"x")],
    }
    for member, members in cases.items():
        with pytest.raises(UnsafeArchiveError, match=re.escape(repr(member))):
            safe_extract(_write_tar(tmp_path / "evil.tar.gz", members), target)
        assert list(target.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "sandbox").iterdir()) == ["target"]


def test_oversized_part_file_is_discarded(server, archives, tmp_path):
    # A stale part longer than the file (say, from another upstream version) answers 416 with the
    # real size; it must be thrown away and fetched again rather than "verified".
    data = archives["dev-clean"]
    server.state.files["/dev-clean.tar.gz"] = data
    dest = tmp_path / "dev-clean.tar.gz"
    ls._part_path(dest).write_bytes(data + b"stale tail")

    download(f"{server.base_url}/dev-clean.tar.gz", dest, _md5(data).upper(), retries=1, **FAST)

    assert dest.read_bytes() == data
    assert [r for _, r in server.state.requests] == [f"bytes={len(data) + 10}-", None]


def test_prepare_refuses_to_split_a_corpus(tmp_path):
    (tmp_path / "my-corpus" / "dev-clean").mkdir(parents=True)
    with pytest.raises(ValueError, match="rename it to 'LibriSpeech'"):
        prepare_librispeech(["dev-clean", "test-clean"], tmp_path / "my-corpus")
