"""Registry indexes over http(s): the index and its signature downloaded with size caps, or the copy kept in the
cache when offline or when the server cannot be reached.

Nothing fetched here is trusted yet: :mod:`index` verifies the pair (the kept copy too, every time it is used).
"""

from __future__ import annotations

import logging
import tempfile
import time
import urllib.parse
from pathlib import Path

from sct_sitehead.errors import DownloadError, HTTPStatusError, OfflineError, RegistryError
from sct_sitehead.registry.cache import Cache
from sct_sitehead.registry.document import MAX_INDEX_BYTES
from sct_sitehead.registry.download import check_url, download
from sct_sitehead.registry.signing import MAX_SIGNATURE_BYTES, SIGNATURE_SUFFIX

logger = logging.getLogger(__name__)

# What a server answers for a file it does not have (403: object stores that hide what exists). A missing
# signature only makes the index unsigned, which is refused unless allowed, so reading these as "absent" is safe.
_ABSENT = frozenset({403, 404, 410})


def fetch_remote_index(url: str, cache: Cache, *, offline: bool, allow_http: bool) -> tuple[bytes, bytes | None, bool]:
    """The index at ``url`` and its signature: downloaded, or the copy kept in the cache when offline.

    Returns:
        ``(index bytes, signature bytes or None, fresh)``; ``fresh`` is false for the kept copy, used offline or
        with a warning when the download fails.

    Raises:
        OfflineError: offline and no copy is kept.
        RegistryError: ``url`` is plain http to a host other than loopback and ``allow_http`` is false.
        DownloadError: the download failed and no copy is kept.
    """
    cached = cache.read_index_copy(url)
    if offline:
        if cached is None:
            raise OfflineError(
                f"offline mode is on and no copy of the registry index {url} is cached in {cache.root}. Run once "
                "with network access to cache it, or omit -registry to use the embedded index."
            )
        logger.info("offline: using the cached copy of %s", url)
        return cached, cache.read_index_signature_copy(url), False
    try:
        check_url(url, allow_http=allow_http)
    except DownloadError as exc:
        raise RegistryError(
            f"{exc} The registry index carries the sha256 of every model file, so it must not travel over plain http."
        ) from None
    try:
        data = download_small(url, cache, max_size=MAX_INDEX_BYTES, allow_http=allow_http)
        signature = download_signature(url, cache, allow_http=allow_http)
    except DownloadError as exc:
        if cached is None:
            raise
        logger.warning("cannot fetch %s (%s); using the copy cached at %s", url, exc, cache.index_copy_path(url))
        return cached, cache.read_index_signature_copy(url), False
    return data, signature, True


def signature_url(url: str) -> str:
    """``https://h/r/registry.json?x`` -> ``https://h/r/registry.json.sig?x`` (the query stays on the URL)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=parts.path + SIGNATURE_SUFFIX))


def download_signature(url: str, cache: Cache, *, allow_http: bool) -> bytes | None:
    """The ``.sig`` of the index at ``url`` (small size cap), or None when the server has none.

    Raises:
        DownloadError: any other failure.
    """
    try:
        return download_small(signature_url(url), cache, max_size=MAX_SIGNATURE_BYTES, allow_http=allow_http)
    except HTTPStatusError as exc:
        if exc.status in _ABSENT:
            logger.debug("no signature for %s (HTTP %d)", url, exc.status)
            return None
        raise


def download_small(url: str, cache: Cache, *, max_size: int, allow_http: bool) -> bytes:
    """Download a small file (index, signature) into a private temporary folder; never resumed, since it
    changes between releases.

    Raises:
        DownloadError: as :func:`download.download`, e.g. over ``max_size``.
    """
    with tempfile.TemporaryDirectory(prefix="sct_sitehead-index-") as folder:
        part = Path(folder) / "download.part"
        download(
            url,
            part,
            expected_size=None,
            max_size=max_size,
            timeout=cache.timeout,
            retries=cache.retries,
            backoff=cache.backoff,
            allow_http=allow_http,
            deadline=time.monotonic() + cache.deadline,
            min_rate=cache.min_rate[0],
            rate_window=cache.min_rate[1],
        )
        return part.read_bytes()
