"""Download, verify and extract LibriSpeech (openslr resource 12).

The corpus is large (about 60 GB of tarballs for all of 960 h), so every step is built to survive
interruption: downloads resume with HTTP Range requests, checksums are cached so a multi-GB
archive is hashed once, and extraction goes through a temporary folder so a subset folder only
appears once it is complete. Only the standard library (urllib, tarfile) and tqdm are used.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import posixpath
import re
import shutil
import ssl
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from edgeconformer.errors import ConfigError, UserError
from edgeconformer.files import write_text_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subset:
    name: str
    md5: str
    approx_bytes: int  # only used for the progress bar when the server sends no Content-Length

    @property
    def archive(self) -> str:
        return f"{self.name}.tar.gz"


# Checksums from https://www.openslr.org/resources/12/md5sum.txt
SUBSETS: dict[str, Subset] = {
    s.name: s
    for s in (
        Subset("dev-clean", "42e2234ba48799c1f50f24a7926300a1", 337_926_286),
        Subset("dev-other", "c8d0bcc9cca99d4f8b62fcc847357931", 314_305_928),
        Subset("test-clean", "32fa31d27d2e1cad72775fee3f4849a9", 346_663_984),
        Subset("test-other", "fb5a50374b501bb3bac4815ee91d3135", 328_757_843),
        Subset("train-clean-100", "2a93770f6d5c6c964bc36631d331a522", 6_387_309_499),
        Subset("train-clean-360", "c0e676e450a7ff2f54aeade5171606fa", 23_049_477_885),
        Subset("train-other-500", "d1a0fd59409feb2c614ce4d30c387708", 30_593_501_910),
    )
}

# Tried in order: the main site first, then the US and EU mirrors.
OPENSLR_BASE_URLS: tuple[str, ...] = (
    "https://www.openslr.org/resources/12",
    "https://us.openslr.org/resources/12",
    "https://openslr.elda.org/resources/12",
)

_USER_AGENT = "edgeconformer-librispeech/0.1 (urllib)"
_HASH_BLOCK = 8 << 20
_MAX_BACKOFF_S = 60.0
# Client errors that will not go away by asking again; everything else (5xx, 408, 429) is retried.
_RETRYABLE_HTTP = {408, 425, 429}


class DownloadError(UserError):
    """A file could not be fetched (after retries / from any mirror)."""


class ChecksumMismatchError(DownloadError):
    pass


class UnsafeArchiveError(UserError):
    """An archive member would write outside the target folder or create a special file."""


class _Interrupted(Exception):
    """The body ended before Content-Length bytes arrived; the next attempt resumes."""


# --------------------------------------------------------------------------- md5 with a cache


def _hash_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".md5")


def _stat_key(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_sidecar(path: Path, md5: str) -> None:
    side = _sidecar(path)
    write_text_atomic(side, json.dumps({**_stat_key(path), "md5": md5}))


def file_md5(path: str | os.PathLike[str]) -> str:
    """MD5 of a file, cached in `<file>.md5` keyed by size and mtime so big archives hash once."""
    path = Path(path)
    side = _sidecar(path)
    try:
        cached = json.loads(side.read_text())
        if {k: cached.get(k) for k in ("size", "mtime_ns")} == _stat_key(path):
            return str(cached["md5"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no cache or an unreadable one: hash again
    md5 = _hash_file(path)
    try:
        _write_sidecar(path, md5)
    except OSError:
        log.debug("could not write md5 cache %s", side)  # read-only folder: caching is optional
    return md5


def _remove_with_sidecar(path: Path) -> None:
    path.unlink(missing_ok=True)
    _sidecar(path).unlink(missing_ok=True)


# --------------------------------------------------------------------------- download


def _part_path(dest: Path) -> Path:
    return dest.with_suffix(dest.suffix + ".part")


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse:
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _range_start(resp: http.client.HTTPResponse) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/", resp.headers.get("Content-Range", ""))
    return int(match[1]) if match else None


def _unsatisfiable_range_total(err: urllib.error.HTTPError) -> int | None:
    match = re.match(r"bytes \*/(\d+)", err.headers.get("Content-Range", "") if err.headers else "")
    return int(match[1]) if match else None


def _is_retryable(err: BaseException) -> bool:
    if isinstance(err, urllib.error.HTTPError):
        return err.code >= 500 or err.code in _RETRYABLE_HTTP
    return isinstance(
        err,
        (_Interrupted, urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, ssl.SSLError),
    )


def _fetch_once(
    url: str, part: Path, *, chunk_size: int, timeout: float, progress: bool, size_hint: int | None
) -> None:
    """One attempt: append to `part` from its current size; raise on any shortfall."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        resp = _open(url, offset, timeout)
    except urllib.error.HTTPError as err:
        if err.code != 416 or not offset:
            raise
        # The range starts at or past the end: the part is complete unless the server says otherwise.
        total = _unsatisfiable_range_total(err)
        if total is not None and total != offset:
            part.unlink()
            raise _Interrupted(f"partial file has {offset} bytes but the server has {total}; restarting") from err
        return

    with resp:
        if offset and (resp.status != 206 or _range_start(resp) != offset):
            # The server ignored (or mangled) the Range request and sends the whole file.
            log.info("%s: server did not resume at byte %d, downloading from the start", url, offset)
            offset = 0
            if resp.status == 206:
                part.unlink()
                raise _Interrupted("server answered a different range; restarting")
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length is not None else size_hint
        received = _copy_body(resp, part, offset, total, chunk_size, progress)

    if length is not None and received < int(length):
        raise _Interrupted(f"connection closed after {offset + received} of {total} bytes")


def _copy_body(
    resp: http.client.HTTPResponse, part: Path, offset: int, total: int | None, chunk_size: int, progress: bool
) -> int:
    received = 0
    mode = "ab" if offset else "wb"
    with (
        open(part, mode) as f,
        tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=part.name.removesuffix(".part"),
            disable=not progress,
            leave=False,
        ) as bar,
    ):
        while True:
            try:
                chunk = resp.read(chunk_size)
            except http.client.IncompleteRead as err:
                # Keep what did arrive so the retry resumes after it.
                f.write(err.partial)
                raise _Interrupted(str(err)) from err
            if not chunk:
                return received
            f.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))


def _mismatch_message(dest: Path, url: str, expected: str, actual: str) -> str:
    return (
        f"MD5 mismatch for {dest.name} downloaded from {url}: expected {expected}, got {actual}. "
        f"The bad file was deleted; run again to re-download it from scratch. If it keeps failing, "
        f"the mirror may serve a broken copy: try another mirror, or fetch {dest.name} by hand, "
        f"check it with `md5sum`, and place it at {dest}."
    )


def download(
    url: str,
    dest: str | os.PathLike[str],
    md5: str | None,
    *,
    retries: int = 5,
    chunk_size: int = 1 << 20,
    timeout: float = 60,
    progress: bool = True,
    backoff: float = 1.0,
    size_hint: int | None = None,
) -> Path:
    """Fetch `url` to `dest`, resuming a `.part` file, retrying with exponential backoff and checking `md5`.

    `retries` is the number of extra attempts after the first; the wait before retry k is
    `backoff * 2**k` seconds. `dest` only ever appears once its checksum is verified.
    """
    dest = Path(dest)
    md5 = md5.lower() if md5 else None
    if dest.exists():
        if md5 is None or file_md5(dest) == md5:
            return dest
        log.warning("%s exists but its MD5 is not %s; downloading it again", dest, md5)
        _remove_with_sidecar(dest)

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(dest)
    _fetch_with_retries(
        url,
        part,
        retries=retries,
        backoff=backoff,
        chunk_size=chunk_size,
        timeout=timeout,
        progress=progress,
        size_hint=size_hint,
    )

    actual = _hash_file(part) if md5 is not None else None
    if md5 is not None and actual != md5:
        # A bad part must not be resumed by the next run, or every later try fails the same way.
        part.unlink(missing_ok=True)
        raise ChecksumMismatchError(_mismatch_message(dest, url, md5, actual or ""))

    os.replace(part, dest)
    if actual is not None:
        _write_sidecar(dest, actual)  # rename keeps the mtime, so the hash just computed stays valid
    return dest


def _fetch_with_retries(url: str, part: Path, *, retries: int, backoff: float, **fetch_kwargs) -> None:
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, **fetch_kwargs)
            return
        except Exception as err:
            if isinstance(err, urllib.error.HTTPError) and not _is_retryable(err):
                # 404 and friends will not heal by waiting; the caller may try another mirror.
                raise DownloadError(f"downloading {url} failed: {err}") from err
            if not _is_retryable(err):
                raise  # e.g. a full disk: not a network problem, so no retry and no mirror fallback
            if attempt == retries:
                raise DownloadError(f"downloading {url} failed after {retries + 1} attempts: {err}") from err
            delay = min(backoff * 2**attempt, _MAX_BACKOFF_S)
            log.warning("download of %s interrupted (%s); retrying in %.1fs", url, err, delay)
            time.sleep(delay)


# --------------------------------------------------------------------------- safe extraction


def _archive_stem(tar_path: Path) -> str:
    name = tar_path.name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return tar_path.stem


def _stamp_path(target_dir: Path, tar_path: Path) -> Path:
    return target_dir / f".extracted-{_archive_stem(tar_path)}"


def _escapes(relative: str) -> bool:
    # Judged lexically: the files do not exist yet, so resolve() would tell nothing.
    norm = posixpath.normpath(relative)
    return norm == ".." or norm.startswith("../")


def _through_symlink(path: str, symlinks: set[str]) -> str | None:
    for parent in PurePosixPath(path).parents:
        if str(parent) in symlinks:
            return str(parent)
    return None


def _refusal(member: tarfile.TarInfo, symlinks: set[str]) -> str | None:
    name = member.name
    if PurePosixPath(name).is_absolute() or re.match(r"^[A-Za-z]:[\\/]", name):
        return "has an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "contains a '..' component"
    if member.isdev():
        return "is a device or FIFO"
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        return f"has an unsupported type {member.type!r}"
    # Writing through an extracted symlink could land anywhere, whatever the link looked like.
    link_dir = _through_symlink(name, symlinks)
    if link_dir:
        return f"would be written through the symlink {link_dir!r}"
    if member.issym() or member.islnk():
        link = member.linkname
        if PurePosixPath(link).is_absolute():
            return f"links to the absolute path {link!r}"
        # Symlinks are relative to the member's folder, hard links to the archive root.
        base = str(PurePosixPath(name).parent) if member.issym() else ""
        resolved = posixpath.join(base, link)
        if _escapes(resolved):
            return f"links outside the target folder ({link!r})"
        via = _through_symlink(posixpath.normpath(resolved), symlinks)
        if via:
            return f"links through the symlink {via!r}"
    return None


def _checked_members(tar: tarfile.TarFile, tar_path: Path) -> Iterator[tarfile.TarInfo]:
    # A generator so that a 30 GB gzip is read once: members are checked as they stream by.
    symlinks: set[str] = set()
    for member in tar:
        reason = _refusal(member, symlinks)
        if reason:
            raise UnsafeArchiveError(f"refusing to extract {tar_path}: member {member.name!r} {reason}")
        if member.issym():
            symlinks.add(posixpath.normpath(member.name))
        yield member


def _check_links_resolve_inside(tree: Path, tar_path: Path) -> None:
    # Final word on symlinks: a chain of individually harmless links can still point outside, and
    # only the real file system can tell (this also covers Pythons without tarfile filters).
    base = os.path.realpath(tree)
    for dirpath, dirnames, filenames in os.walk(tree):
        for entry in dirnames + filenames:
            path = os.path.join(dirpath, entry)
            if not os.path.islink(path):
                continue
            real = os.path.realpath(path)
            if real != base and not real.startswith(base + os.sep):
                member = os.path.relpath(path, tree)
                raise UnsafeArchiveError(
                    f"refusing to extract {tar_path}: member {member!r} is a symlink "
                    "resolving outside the target folder"
                )


def _extract_all(tar_path: Path, dest: Path) -> None:
    with tarfile.open(tar_path, "r:*") as tar:
        kwargs = {}
        if hasattr(tarfile, "data_filter"):
            # Python >= 3.10.12/3.11.4/3.12: a second line of defence after our own checks, and it
            # silences the 3.12+ deprecation warning about unfiltered extraction.
            kwargs["filter"] = "data"
        tar.extractall(dest, members=_checked_members(tar, tar_path), **kwargs)


def _merge_into(src: Path, dst: Path) -> None:
    """Move the extracted tree into place. New folders move in one rename, so they appear whole;
    files shared by several archives (LibriSpeech/README.TXT, SPEAKERS.TXT ...) are replaced."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        target = dst / entry.name
        if entry.is_dir() and not entry.is_symlink() and target.is_dir() and not target.is_symlink():
            _merge_into(entry, target)
        elif target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
            os.replace(entry, target)
        else:
            os.replace(entry, target)


def _remove_stale_temp_dirs(target_dir: Path, prefix: str) -> None:
    # Left behind by a run that was killed mid-extraction.
    for stale in target_dir.glob(prefix + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def safe_extract(
    tar_path: str | os.PathLike[str], target_dir: str | os.PathLike[str], *, md5: str | None = None
) -> Path:
    """Extract `tar_path` into `target_dir`, refusing members that escape it or are special files.

    Completion is recorded in `target_dir/.extracted-<archive stem>` (holding the archive's MD5), so
    a second call with the same archive is a no-op. Returns `target_dir`.
    """
    tar_path, target_dir = Path(tar_path), Path(target_dir).absolute()
    target_dir.mkdir(parents=True, exist_ok=True)
    checksum = (md5 or file_md5(tar_path)).lower()
    stamp = _stamp_path(target_dir, tar_path)
    if stamp.is_file() and stamp.read_text().strip() == checksum:
        log.info("%s already extracted into %s", tar_path.name, target_dir)
        return target_dir

    prefix = f".tmp-extract-{_archive_stem(tar_path)}-"
    _remove_stale_temp_dirs(target_dir, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target_dir))
    try:
        log.info("extracting %s into %s", tar_path.name, target_dir)
        _extract_all(tar_path, tmp)
        _check_links_resolve_inside(tmp, tar_path)
        _merge_into(tmp, target_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stamp.write_text(checksum + "\n")
    return target_dir


# --------------------------------------------------------------------------- LibriSpeech layout


def _check_subsets(subsets: Iterable[str] | str) -> list[str]:
    names = [subsets] if isinstance(subsets, str) else list(subsets)
    unknown = [s for s in names if s not in SUBSETS]
    if unknown:
        raise ConfigError(f"unknown LibriSpeech subset(s) {unknown}; valid names: {', '.join(SUBSETS)}")
    return list(dict.fromkeys(names))  # drop duplicates, keep order


def _holds_subsets(folder: Path, subsets: Iterable[str]) -> bool:
    return all((folder / s).is_dir() for s in subsets)


def subset_urls(subset: str, base_urls: Sequence[str] | None = None) -> list[str]:
    archive = SUBSETS[subset].archive
    return [f"{base.rstrip('/')}/{archive}" for base in (base_urls or OPENSLR_BASE_URLS)]


def _download_from_mirrors(subset: Subset, download_dir: Path, base_urls: Sequence[str] | None, **kwargs) -> Path:
    dest = download_dir / subset.archive
    failures: list[str] = []
    last: DownloadError | None = None
    for url in subset_urls(subset.name, base_urls):
        try:
            return download(url, dest, subset.md5, size_hint=subset.approx_bytes, **kwargs)
        except DownloadError as err:
            log.warning("%s", err)
            failures.append(f"  {url}: {err}")
            last = err
    summary = "\n".join(failures)
    raise DownloadError(f"could not download {subset.archive} from any mirror:\n{summary}") from last


def prepare_librispeech(
    subsets: Sequence[str],
    root: str | os.PathLike[str],
    *,
    download_dir: str | os.PathLike[str] | None = None,
    base_urls: Sequence[str] | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    progress: bool = True,
    keep_archives: bool = True,
    download: bool = True,
) -> Path:
    """Make sure `subsets` exist under `root` and return the `LibriSpeech/` folder holding them.

    `root` may be the `LibriSpeech/` folder or its parent. Subsets already on disk are used as they
    are, with no network access; missing ones are downloaded (mirrors in order, `base_urls`
    overriding openslr), verified and extracted. Archives go to `download_dir` (default: next to
    the `LibriSpeech/` folder).
    """
    names = _check_subsets(subsets)
    root = Path(root).absolute()
    for candidate in (root, root / "LibriSpeech"):
        if _holds_subsets(candidate, names):
            return candidate

    corpus = root if root.name == "LibriSpeech" else root / "LibriSpeech"
    if corpus is not root and any((root / s).is_dir() for s in SUBSETS):
        # The archives unpack to LibriSpeech/<subset>; mixing that with subsets sitting directly in
        # `root` would split the corpus over two folders.
        raise ConfigError(
            f"{root} holds LibriSpeech subset folders directly but is not named 'LibriSpeech'; "
            f"rename it to 'LibriSpeech' and pass it (or its parent) as root"
        )
    extract_dir = corpus.parent
    archives = Path(download_dir).absolute() if download_dir is not None else extract_dir

    missing = [n for n in names if not (corpus / n).is_dir()]
    if missing and not download:
        raise ConfigError(
            f"LibriSpeech subset(s) {missing} not found under {root}; point data.root at a tree "
            "that holds them or set data.download=true to fetch them from openslr"
        )
    for name in missing:
        subset = SUBSETS[name]
        stamp = _stamp_path(extract_dir, Path(subset.archive))
        stamp.unlink(missing_ok=True)  # the folder is gone, so an old stamp no longer tells the truth
        tar_path = _download_from_mirrors(
            subset, archives, base_urls, retries=retries, backoff=backoff, progress=progress
        )
        safe_extract(tar_path, extract_dir, md5=subset.md5)
        if not (corpus / name).is_dir():
            raise DownloadError(f"{tar_path} did not contain LibriSpeech/{name}/")
        if not keep_archives:
            _remove_with_sidecar(tar_path)
    return corpus
