"""Content-addressed cache of model files: one lock per asset, verified before it is moved into place.

Layout (docs/DESIGN.md)::

    assets/sha256/<hex[:2]>/<hex>   verified assets, read-only
    indexes/<sha256 of URL>.json    last good copy of each remote registry index (.json.sig: its signature)
    locks/<hex>.lock                one lock per asset (seen.lock: the state file's); <hex>.holder: who holds it
    state/seen.json                 highest index serial seen per location and key (rollback protection)
    tmp/<hex>.part                  partial downloads, resumed with HTTP Range
    ort/                            ONNX Runtime optimised models, each with its recorded sha256 (graphs.py)

A file only ever reaches ``assets/`` by an atomic ``os.replace`` after its size and sha256 were checked. A file at
rest is still not trusted: a disk, a backup tool or another program may change it, so :meth:`Cache.fetch` hashes a
cached asset again every time it hands it out (about 5 ms for a 5.6 MB backbone) and replaces one that fails. The
fast path takes no lock and makes no network call, which is also what lets a read-only, pre-filled cache work.
Paths are built from the validated sha256 only, never from names or URLs in the index.
"""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sct_sitehead import env
from sct_sitehead.atomic import move_into_place, write_bytes_atomic
from sct_sitehead.errors import DownloadError, IntegrityError, OfflineError, OutputError, RegistryError
from sct_sitehead.registry import untrusted_json
from sct_sitehead.registry.download import MIN_RATE, RATE_WINDOW, download, is_remote, remove
from sct_sitehead.registry.specs import Asset

if TYPE_CHECKING:
    from filelock import FileLock

logger = logging.getLogger(__name__)

_HEX = re.compile(r"[0-9a-f]{64}")
_READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
#: Seconds one model file's download may take in all, every mirror and retry included, unless
#: ``SCT_SITEHEAD_DOWNLOAD_TIMEOUT`` says otherwise: a 5.6 MB backbone at the minimum rate takes 45 minutes, at
#: a slow 1 Mbit/s 45 s.
DOWNLOAD_TIMEOUT = 900.0
#: Seconds beyond the download deadline that a process waits for another one's download of the same asset: the
#: holder's own deadline stops it first, so a wait this long means it is stuck (or suspended).
LOCK_GRACE = 60.0


class Cache:
    """The asset cache under ``root`` (default ``$SCT_SITEHEAD_CACHE`` or the platform user cache).

    Args:
        root: cache folder; created lazily, only when something is written.
        timeout: (connect, read) seconds for each request.
        retries: further attempts per URL after the first.
        backoff: first wait between attempts, doubled each time.
        deadline: seconds one file's download may take in all (every URL and attempt); default
            ``$SCT_SITEHEAD_DOWNLOAD_TIMEOUT``, else :data:`DOWNLOAD_TIMEOUT`.
        min_rate: (bytes per second, seconds): a transfer slower than this over that window is stopped.
        lock_timeout: seconds to wait for another process downloading the same asset; default ``deadline`` plus
            :data:`LOCK_GRACE`.
    """

    def __init__(
        self,
        root: Path | str | None = None,
        *,
        timeout: tuple[float, float] = (10, 60),
        retries: int = 4,
        backoff: float = 0.5,
        deadline: float | None = None,
        min_rate: tuple[float, float] = (MIN_RATE, RATE_WINDOW),
        lock_timeout: float | None = None,
    ) -> None:
        self.root = Path(root) if root is not None else env.cache_dir()
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.deadline = deadline if deadline is not None else (env.download_timeout() or DOWNLOAD_TIMEOUT)
        self.min_rate = min_rate
        self.lock_timeout = lock_timeout if lock_timeout is not None else self.deadline + LOCK_GRACE

    def __repr__(self) -> str:
        return f"Cache({str(self.root)!r})"

    # --- paths --------------------------------------------------------------------------------------------------
    def asset_path(self, sha256: str) -> Path:
        """Where the asset with this sha256 lives once verified (it may not exist yet).

        Raises:
            RegistryError: ``sha256`` is not 64 lowercase hex digits (it could otherwise name any path).
        """
        checked = checked_hex(sha256)
        return self.root / "assets" / "sha256" / checked[:2] / checked

    def index_copy_path(self, url: str) -> Path:
        """Where the last good copy of the remote index at ``url`` is kept."""
        return self.root / "indexes" / f"{hashlib.sha256(url.encode()).hexdigest()}.json"

    def index_signature_copy_path(self, url: str) -> Path:
        """Where the signature of the kept copy of ``url`` is kept (beside it), so offline use re-verifies it."""
        copy = self.index_copy_path(url)
        return copy.with_name(copy.name + ".sig")

    def seen_path(self) -> Path:
        """The rollback-protection state: highest serial seen per registry location and key (see trust.py)."""
        return self.root / "state" / "seen.json"

    def ort_dir(self) -> Path:
        """Folder for ONNX Runtime's optimised models (created when the cache is writable)."""
        path = self.root / "ort"
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            logger.debug("cannot create %s: %s", path, exc)
        return path

    # --- assets -------------------------------------------------------------------------------------------------
    def fetch(self, asset: Asset, *, offline: bool, progress: bool = False, allow_http: bool = False) -> Path:
        """Return the verified local copy of ``asset``, downloading it first if needed.

        A cached copy is hashed again first: one whose sha256 is not ``asset.sha256`` (damaged at rest) is removed
        and fetched again, or, offline with no local URL, reported. Tries ``asset.urls`` in order; one process
        downloads while the others wait on the asset's lock (at most ``lock_timeout`` seconds).

        Raises:
            OfflineError: offline and not cached.
            IntegrityError: every URL failed and at least one served the wrong bytes (nothing is kept); or the
                cached copy is damaged and cannot be fetched again (offline) or removed (read-only cache).
            DownloadError: every URL failed to deliver, the deadline passed, or another process held the asset's
                lock longer than ``lock_timeout``.
            OutputError: the asset is missing and the cache cannot be written.
            RegistryError: the asset's sha256 is malformed.
        """
        final = self.asset_path(asset.sha256)
        damage = cached_damage(final, asset.sha256)
        if damage is None:
            return final
        if offline:
            # Offline forbids the network, not the disk: an embedded or local registry's files are still copied in.
            local = tuple(url for url in asset.urls if not is_remote(url))
            if not local:
                if damage:
                    self._discard(final, asset, damage)
                    raise IntegrityError(damaged_offline_message(asset, final, damage))
                raise OfflineError(offline_message(asset, self.root))
            asset = dataclasses.replace(asset, urls=local)
        if damage:
            logger.warning("the cached %s (%s) %s; fetching it again", describe(asset), final, damage)
        allow_http = allow_http or env.allow_plain_http()
        lock = self._lock(asset.sha256)
        self._acquire(lock, asset, damage)
        try:
            damage = cached_damage(final, asset.sha256)
            if damage is None:
                logger.debug("%s was downloaded by another process meanwhile", asset.name)
                return final
            if damage:
                self._discard(final, asset, damage)
            return self._download(asset, final, progress=progress, allow_http=allow_http)
        finally:
            lock.release()

    def _discard(self, final: Path, asset: Asset, damage: str) -> None:
        """Remove a damaged cached asset.

        Raises:
            IntegrityError: it cannot be removed (a read-only cache): the run must not use it, nor go on without it.
        """
        try:
            final.unlink(missing_ok=True)
        except OSError as exc:
            raise IntegrityError(
                f"the cached {describe(asset)} ({final}) {damage}, and it cannot be removed ({exc.strerror or exc}). "
                "Nothing was run with it. Replace the cache, or point SCT_SITEHEAD_CACHE to a writable folder."
            ) from None

    def _download(self, asset: Asset, final: Path, *, progress: bool, allow_http: bool) -> Path:
        """Try each URL; the first whose bytes verify is moved into place. Caller holds the asset's lock."""
        part = self.root / "tmp" / f"{asset.sha256}.part"
        failures: list[tuple[str, str]] = []
        mismatch: str | None = None
        if not asset.urls:
            raise DownloadError(f"{describe(asset)} has no URL to download it from; fix the registry index")
        deadline = time.monotonic() + self.deadline
        for url in asset.urls:
            # A part left by an earlier run or URL is resumed; if the result is wrong, that URL gets one clean try.
            resumed = part.exists()
            error = self._download_one(asset, url, part, progress=progress, allow_http=allow_http, deadline=deadline)
            if isinstance(error, IntegrityError) and resumed:
                logger.info("%s: resumed file did not verify, downloading again from the start", url)
                error = self._download_one(
                    asset, url, part, progress=progress, allow_http=allow_http, deadline=deadline
                )
            if error is None:
                try:
                    move_into_place(part, final, mode=_READ_ONLY)
                except OSError as exc:
                    raise OutputError(
                        f"cannot move the verified download into {final}: {exc.strerror or exc}"
                    ) from None
                logger.info("cached %s (%d bytes) at %s", asset.name, asset.size, final)
                return final
            failures.append((url, str(error)))
            if isinstance(error, IntegrityError) and mismatch is None:
                mismatch = str(error)
        listing = "".join(f"\n  {url}: {reason}" for url, reason in failures)
        if mismatch is not None:
            others = listing if len(failures) > 1 else ""
            raise IntegrityError(f"{mismatch}{others}")
        raise DownloadError(
            f"could not download {describe(asset)} from any of its {len(failures)} URL(s):{listing}\n"
            "Check the network and proxy settings (HTTPS_PROXY), or use -registry to pick a mirror."
        )

    def _download_one(
        self, asset: Asset, url: str, part: Path, *, progress: bool, allow_http: bool, deadline: float | None = None
    ) -> IntegrityError | DownloadError | None:
        """Download ``url`` into ``part`` and verify it; None when ``part`` now holds the asset."""
        try:
            download(
                url,
                part,
                expected_size=asset.size,
                max_size=asset.size,
                timeout=self.timeout,
                retries=self.retries,
                backoff=self.backoff,
                progress=progress,
                allow_http=allow_http,
                deadline=deadline,
                min_rate=self.min_rate[0],
                rate_window=self.min_rate[1],
            )
        except IntegrityError as exc:
            remove(part)
            return exc
        except DownloadError as exc:
            return exc  # the part is kept: the next URL resumes it, and the hash check settles it
        size = part.stat().st_size
        if size != asset.size:
            remove(part)
            return IntegrityError(
                f"size of {asset.name} from {url} is {size} bytes, expected {asset.size}; the download was "
                "discarded. Try again, or use -registry to pick a mirror."
            )
        digest = sha256_file(part)
        if digest != asset.sha256:
            remove(part)
            return IntegrityError(
                f"sha256 of {asset.name} from {url} is {digest}, expected {asset.sha256}; the download was "
                "discarded. Try again, or use -registry to pick a mirror."
            )
        return None

    def _lock(self, sha256: str) -> FileLock:
        from filelock import FileLock

        return FileLock(str(self.root / "locks" / f"{checked_hex(sha256)}.lock"))

    def _acquire(self, lock: FileLock, asset: Asset, damage: str = "") -> None:
        """Take the asset's lock, waiting at most ``lock_timeout`` seconds for another process downloading it,
        and record this process as its holder (``locks/<sha256>.holder``) for the messages of those who wait.

        Raises:
            OutputError: the lock file cannot be created (read-only cache without this asset).
            IntegrityError: the same, when the cached copy is damaged (it can be neither replaced nor used).
            DownloadError: another process held the lock for ``lock_timeout`` seconds.
        """
        from filelock import Timeout

        holder = Path(lock.lock_file).with_suffix(".holder")
        timed_out = False
        try:
            Path(lock.lock_file).parent.mkdir(parents=True, exist_ok=True)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                logger.info("waiting for another process to finish downloading %s", asset.name)
                try:
                    lock.acquire(timeout=self.lock_timeout)
                except Timeout:
                    timed_out = True
        except OSError as exc:
            if damage:
                raise IntegrityError(
                    f"the cached {describe(asset)} {damage}, and the cache {self.root} cannot be written to replace "
                    f"it (lock file {lock.lock_file}: {exc.strerror or exc}). Nothing was run with it. Replace the "
                    "cache, or set SCT_SITEHEAD_CACHE to a writable folder."
                ) from None
            raise OutputError(
                f"{describe(asset)} is not in the cache {self.root}, and the cache cannot be written "
                f"(lock file {lock.lock_file}: {exc.strerror or exc}). Set SCT_SITEHEAD_CACHE to a writable folder, "
                "or pre-fill this cache with `sct_sitehead models install` on a machine that can write it."
            ) from None
        if timed_out:
            raise DownloadError(lock_timeout_message(asset, self.lock_timeout, holder))
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "asset": describe(asset)}
        try:
            write_bytes_atomic(holder, json.dumps(record).encode("utf-8"))
        except OSError as exc:
            logger.debug("cannot record the holder of %s: %s", lock.lock_file, exc)

    # --- index copies -------------------------------------------------------------------------------------------
    def read_index_copy(self, url: str) -> bytes | None:
        """The last good copy of the remote index at ``url``, or None."""
        return read_optional(self.index_copy_path(url), f"the cached copy of {url}")

    def read_index_signature_copy(self, url: str) -> bytes | None:
        """The signature kept beside the copy of ``url`` (None: the index was unsigned, or no copy)."""
        return read_optional(self.index_signature_copy_path(url), f"the cached signature of {url}")

    def save_index_copy(self, url: str, data: bytes, signature: bytes | None = None) -> None:
        """Keep ``data`` (and its raw ``.sig``, if any) as the last good copy of ``url``.

        The copy is re-verified whenever it is used, so a crash between the two renames can at worst leave a
        pair that is refused (and replaced by the next online run), never one that is trusted wrongly. A
        read-only cache only logs a warning.
        """
        target = self.index_copy_path(url)
        try:
            if signature is None:
                remove(self.index_signature_copy_path(url))
            else:
                write_bytes_atomic(self.index_signature_copy_path(url), signature)
            write_bytes_atomic(target, data)
        except OSError as exc:
            logger.warning("cannot keep a copy of %s in %s (offline use will not see it): %s", url, target, exc)

    # --- maintenance --------------------------------------------------------------------------------------------
    def list(self) -> list[dict[str, Any]]:
        """Cached assets, sorted by sha256: ``[{"sha256": str, "size": int, "path": Path}, ...]``."""
        base = self.root / "assets" / "sha256"
        entries = []
        for path in sorted(base.glob("??/*")):
            if _HEX.fullmatch(path.name) and path.parent.name == path.name[:2] and path.is_file():
                entries.append({"sha256": path.name, "size": path.stat().st_size, "path": path})
        return entries

    def verify(self) -> builtins.list[Path]:  # builtins: `list` here is the method above
        """Re-hash every cached asset; delete those whose content does not match their name.

        Returns:
            the paths that were corrupt (now removed).
        """
        bad = []
        for entry in self.list():
            digest = sha256_file(entry["path"])
            if digest != entry["sha256"]:
                logger.warning("%s is corrupt (sha256 %s); removing it", entry["path"], digest)
                try:
                    entry["path"].unlink()
                except OSError as exc:
                    raise OutputError(f"cannot remove corrupt asset {entry['path']}: {exc.strerror or exc}") from None
                bad.append(entry["path"])
        return bad

    def clean(self, keep: set[str] | None = None) -> int:
        """Delete cached assets (all, or those whose sha256 is not in ``keep``) and stale partial downloads.

        An asset or part whose lock another process holds is left alone. With ``keep=None`` the index copies
        and ONNX Runtime files go too. Lock files stay: deleting one another process may be about to open
        would let two processes hold "the" lock at once.

        Returns:
            bytes freed.
        """
        from filelock import Timeout

        freed = 0
        candidates = [(e["sha256"], e["path"]) for e in self.list() if not keep or e["sha256"] not in keep]
        candidates += [(p.stem, p) for p in sorted((self.root / "tmp").glob("*.part")) if _HEX.fullmatch(p.stem)]
        for sha256, path in candidates:
            lock = self._lock(sha256)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                logger.info("%s is in use by another process; left in place", path)
                continue
            except OSError as exc:
                raise OutputError(f"cannot clean the cache {self.root}: {exc.strerror or exc}") from None
            try:
                size = path.stat().st_size
                path.unlink()
                freed += size
            except FileNotFoundError:
                pass
            finally:
                lock.release()
        if keep is None:
            freed += remove_tree_contents(self.root / "indexes") + remove_tree_contents(self.root / "ort")
        return freed


def checked_hex(sha256: str) -> str:
    """``sha256`` itself if it is 64 lowercase hex digits.

    Raises:
        RegistryError: anything else, which must never become part of a path.
    """
    if not isinstance(sha256, str) or not _HEX.fullmatch(sha256):
        raise RegistryError(
            f"invalid sha256 {sha256!r}: expected 64 lowercase hexadecimal digits; fix the registry index"
        )
    return sha256


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's content."""
    # Read in blocks, not with hashlib.file_digest: that is Python 3.11+, and the package supports 3.10.
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_optional(path: Path, what: str) -> bytes | None:
    """A file's bytes, or None when it is missing or unreadable (logged: the caller then works without it)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        logger.warning("cannot read %s (%s): %s", what, path, exc)
        return None


def remove_tree_contents(folder: Path) -> int:
    """Delete everything inside ``folder`` (not the folder); return bytes freed."""
    freed = 0
    if not folder.is_dir():
        return 0
    for child in folder.iterdir():
        try:
            if child.is_dir() and not child.is_symlink():
                freed += sum(f.stat().st_size for f in child.rglob("*") if f.is_file())
                shutil.rmtree(child)
            else:
                freed += child.stat().st_size
                child.unlink()
        except OSError as exc:
            raise OutputError(f"cannot remove {child}: {exc.strerror or exc}") from None
    return freed


def describe(asset: Asset) -> str:
    """``backbone.onnx of lesion@1.0.0`` (the release is left out when unknown)."""
    return f"{asset.name} of {asset.release}" if asset.release else asset.name


def cached_damage(path: Path, sha256: str) -> str | None:
    """None when ``path`` holds the bytes of ``sha256``; ``""`` when it does not exist; otherwise what is wrong
    with it (its sha256, or why it cannot be read)."""
    try:
        digest = sha256_file(path)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None if digest == sha256 else f"has sha256 {digest}, expected {sha256} (damaged since it was verified)"


def damaged_offline_message(asset: Asset, path: Path, damage: str) -> str:
    """Why an offline run stopped at a damaged cached asset, and the fix."""
    spec = asset.release or "MODEL@VERSION"
    site = asset.site or "SITE"
    return (
        f"the cached {describe(asset)} ({path}) {damage}; it was removed, and offline mode forbids downloading it "
        f"again. Nothing was run with it. On a connected machine run `sct_sitehead models install {spec} -site "
        f"{site}` and copy its cache folder here, or run without -offline."
    )


def lock_timeout_message(asset: Asset, waited: float, holder: Path) -> str:
    """Who holds an asset's lock (from its holder record, read as untrusted JSON), and what to do."""
    try:
        record = untrusted_json.loads(holder.read_bytes(), f"lock holder record {holder}")
    except (OSError, RegistryError):
        record = None
    who = "another process"
    if isinstance(record, dict) and isinstance(record.get("pid"), int):
        since = record.get("since")
        started = time.strftime("%H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
        who = f"process {record['pid']} on {str(record.get('host', '?'))[:64]} (holding it since {started})"
    return (
        f"waited {waited:.0f} s for {who} to finish downloading {describe(asset)}, and it has not; its lock is "
        f"{holder.with_suffix('.lock')}. If that process is stuck or suspended, stop it and run again; its partial "
        "download is resumed."
    )


def offline_message(asset: Asset, root: Path) -> str:
    """Why an offline run stopped, and the two ways to pre-fetch the asset."""
    spec = asset.release or "MODEL@VERSION"
    site = asset.site or "SITE"
    return (
        f"{describe(asset)} (sha256 {asset.sha256[:12]}...) is not in the cache {root}, and offline mode forbids "
        f"downloading it. On a connected machine run `sct_sitehead models install {spec} -site {site}` and copy its "
        f"cache folder here (or point SCT_SITEHEAD_CACHE to a copy), or run without -offline."
    )
