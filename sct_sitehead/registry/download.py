"""Stream one URL to a partial file: HTTP Range resume, retries with backoff, timeouts, a size cap, an overall
deadline and a minimum rate.

The caller owns the partial file and checks the result (size, sha256); this module only moves bytes and
decides which failures are worth another attempt. ``file://`` URLs and plain paths are copied.

URL policy: ``https://`` always; ``http://`` only to a loopback host (127.0.0.0/8, ::1, ``localhost``) unless
the caller allows plain HTTP. Redirects are followed by hand so each hop is checked: a redirect may go to
any ``https://`` URL or to loopback ``http://``; plain ``http://`` elsewhere only when allowed *and* on the
host first asked for, because a redirect must not be a way to downgrade to a host the user never named.

Time policy: the (connect, read) timeouts bound each wait for the server; the deadline bounds the whole download
(every attempt, every wait between them), and the minimum rate stops a server that keeps a connection alive with
a trickle of bytes (one every few seconds resets any read timeout). The body is read as it arrives (``read1``), so
both are checked after every network read, not after every 64 KiB.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal, NoReturn

from sct_sitehead.errors import DownloadError, HTTPStatusError, IntegrityError, OutputError
from sct_sitehead.version import __version__

if TYPE_CHECKING:
    import requests
    from tqdm import tqdm

logger = logging.getLogger(__name__)

CHUNK = 1 << 16
MAX_REDIRECTS = 10
USER_AGENT = f"sct_sitehead/{__version__}"
_RETRY_STATUSES = frozenset({408, 429})
#: Slowest transfer accepted, in bytes per second averaged over :data:`RATE_WINDOW` seconds: 1/60 of a slow
#: 1 Mbit/s link, so only a stalled or hostile server falls below it.
MIN_RATE = 2048
#: Seconds over which the rate is measured (the first window starts with the body).
RATE_WINDOW = 30.0


class _Retry(Exception):
    """A failure that another attempt may fix; what was written so far is kept for resuming."""


class _Restart(Exception):
    """The partial file is unusable (server ignored or refused our range); start again from byte 0."""


def is_loopback(host: str | None) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_remote(url: str) -> bool:
    """True for ``http://`` and ``https://`` URLs (everything else is a local path or ``file://``)."""
    return urllib.parse.urlsplit(url).scheme.lower() in ("http", "https")


def check_url(url: str, *, allow_http: bool) -> None:
    """Refuse a URL this client must not fetch.

    Raises:
        DownloadError: plain ``http://`` to a host that is not loopback while ``allow_http`` is false, or a
            scheme other than http, https, file.
    """
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    # A Windows drive letter (C:\models) parses as a one-letter scheme: it is a local path.
    if scheme in ("https", "file", "") or len(scheme) == 1:
        return
    if scheme != "http":
        raise DownloadError(f"cannot fetch {url}: unsupported scheme {scheme!r}; use https://, http:// or file://")
    if is_loopback(parts.hostname) or allow_http:
        return
    raise DownloadError(
        f"refusing plain http:// download {url}: traffic to {parts.hostname} could be read or altered in transit. "
        "Use an https:// URL, or set SCT_SITEHEAD_ALLOW_HTTP=1 (-allow-http) for a mirror on a trusted network."
    )


def download(
    url: str,
    part: Path,
    *,
    expected_size: int | None,
    max_size: int,
    timeout: tuple[float, float] = (10, 60),
    retries: int = 4,
    backoff: float = 0.5,
    progress: bool = False,
    session: requests.Session | None = None,
    allow_http: bool = False,
    deadline: float | None = None,
    min_rate: float = MIN_RATE,
    rate_window: float = RATE_WINDOW,
) -> None:
    """Fetch ``url`` into ``part``, resuming from the bytes ``part`` already holds.

    Args:
        url: ``https://``, ``http://`` (see the module's URL policy), ``file://`` or a local path.
        part: partial file to append to (created if missing); on success it holds the whole body.
        expected_size: exact size in bytes when known; a longer body is refused, a shorter one resumed.
        max_size: hard cap in bytes, whatever the server declares.
        timeout: (connect, read) seconds.
        retries: further attempts after the first, for 5xx, 408/429, connection errors, timeouts, short bodies.
        backoff: first wait in seconds; doubled after each failed attempt.
        progress: draw a tqdm bar on stderr (pass ``sys.stderr.isatty()``).
        session: a ``requests.Session`` to reuse; a new one (honouring proxy variables) otherwise.
        allow_http: allow plain ``http://`` to hosts other than loopback.
        deadline: ``time.monotonic()`` by which the download must be complete (None: no deadline); no attempt
            starts and no wait goes past it, and a transfer still running then is stopped.
        min_rate: bytes per second below which a transfer is stopped (averaged over ``rate_window`` seconds); 0
            accepts any rate.
        rate_window: seconds over which the rate is averaged.

    Raises:
        DownloadError: HTTP 4xx, refused URL, a body over ``max_size`` (no ``expected_size``), a compressed body
            although ``identity`` was asked for, the deadline passed, a rate below ``min_rate``, or still failing
            after ``retries`` more attempts.
        IntegrityError: the body is longer than ``expected_size``; the partial file is deleted.
        OutputError: ``part`` cannot be written.
    """
    exact = expected_size is not None and expected_size <= max_size
    limit = max_size if expected_size is None else min(expected_size, max_size)
    job = _Job(url, part, limit, exact, timeout, progress, allow_http, deadline, min_rate, rate_window)
    check_url(url, allow_http=allow_http)
    if not is_remote(url):
        copy_local(job)
        return
    own_session = session is None
    if session is None:
        session = new_session()
    try:
        attempt = 0
        while True:
            try:
                fetch_once(job, session)
                return
            except _Restart as reason:
                logger.info("restarting %s from byte 0: %s", url, reason)
                remove(part)
                failure: Exception = reason
            except _Retry as reason:
                failure = reason
            attempt += 1
            if attempt > retries:
                raise DownloadError(f"{url}: {failure} (gave up after {attempt} attempts)") from None
            # Jitter spreads out clients that failed together (a mirror restart) so they do not return together.
            delay = backoff * 2 ** (attempt - 1) * random.uniform(0.75, 1.25)
            if deadline is not None and time.monotonic() + delay >= deadline:
                raise deadline_error(job, f"after {attempt} attempt(s), the last: {failure}")
            logger.warning("%s: %s; attempt %d of %d in %.1f s", url, failure, attempt + 1, retries + 1, delay)
            time.sleep(delay)
    finally:
        if own_session:
            session.close()


@dataclass(frozen=True)
class _Job:
    """What one :func:`download` call needs at every attempt."""

    url: str
    part: Path
    limit: int
    exact: bool
    timeout: tuple[float, float]
    progress: bool
    allow_http: bool
    deadline: float | None = None
    min_rate: float = MIN_RATE
    rate_window: float = RATE_WINDOW

    def timeouts(self) -> tuple[float, float]:
        """(connect, read) timeouts for the next request, none longer than the time left before the deadline."""
        if self.deadline is None:
            return self.timeout
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise deadline_error(self, "before the request could be made")
        return min(self.timeout[0], left), min(self.timeout[1], left)


def new_session() -> requests.Session:
    """A session that honours HTTP(S)_PROXY / NO_PROXY and REQUESTS_CA_BUNDLE (``trust_env`` stays on)."""
    import requests

    session = requests.Session()
    session.headers["User-Agent"] = USER_AGENT
    return session


def fetch_once(job: _Job, session: requests.Session) -> None:
    """One attempt: request the bytes ``job.part`` lacks and append them.

    Raises:
        _Retry: transient failure (what arrived is kept); _Restart: discard the part and start over;
        DownloadError, IntegrityError, OutputError: final, see :func:`download`.
    """
    import requests

    have = file_size(job.part)
    if have > job.limit:
        remove(job.part)
        have = 0
    if job.exact and have == job.limit:
        return
    # identity: Range offsets and Content-Length then count the bytes we store, not compressed ones.
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = get_following_redirects(session, job, headers)
    except requests.exceptions.SSLError as exc:
        raise DownloadError(
            f"{job.url}: TLS verification failed ({exc}); behind a proxy that re-signs traffic, point "
            "REQUESTS_CA_BUNDLE to its certificate"
        ) from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise _Retry(f"connection failed: {exc}") from None
    except requests.exceptions.RequestException as exc:
        raise DownloadError(f"{job.url}: {exc}") from None
    with response:
        start, total = plan_write(job, response, have)
        if start < 0:
            return
        try:
            end = stream_body(job, response, start, total)
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout, TimeoutError) as exc:
            raise _Retry(f"connection lost after {file_size(job.part)} bytes: {exc}") from None
        except requests.exceptions.RequestException as exc:
            raise _Retry(f"transfer failed after {file_size(job.part)} bytes: {exc}") from None
        except _transfer_errors() as exc:
            raise _Retry(f"transfer failed after {file_size(job.part)} bytes: {exc}") from None
    wanted = total if total is not None else (job.limit if job.exact else None)
    if wanted is not None and end < wanted:
        raise _Retry(f"body ended after {end} of {wanted} bytes")


def get_following_redirects(session: requests.Session, job: _Job, headers: dict[str, str]) -> requests.Response:
    """GET with redirects followed by hand, so every hop passes :func:`check_url` (see the module notes)."""
    first_host = urllib.parse.urlsplit(job.url).hostname
    current = job.url
    for _ in range(MAX_REDIRECTS + 1):
        response = session.get(current, headers=headers, timeout=job.timeouts(), stream=True, allow_redirects=False)
        if not response.is_redirect:
            return response
        target = urllib.parse.urljoin(current, response.headers["location"])
        response.close()
        target_parts = urllib.parse.urlsplit(target)
        if target_parts.scheme.lower() not in ("http", "https"):
            raise DownloadError(f"{job.url} redirects to {target}; only http(s) redirects are followed")
        check_url(target, allow_http=job.allow_http and target_parts.hostname == first_host)
        logger.debug("%s redirects to %s", current, target)
        current = target
    raise DownloadError(f"{job.url}: more than {MAX_REDIRECTS} redirects; the server is misconfigured")


def plan_write(job: _Job, response: requests.Response, have: int) -> tuple[int, int | None]:
    """From the status, where the body starts in the file and the whole file's size if the server says.

    Returns:
        ``(start, total)``; ``start`` is -1 when the partial file is already complete (416 at its end).
    """
    status = response.status_code
    if status == 416:
        total = content_range_total(response.headers.get("Content-Range"))
        if not have:
            raise DownloadError(f"HTTP 416 for {job.url} although no range was asked for; the server is misconfigured")
        if total == have:
            return -1, have
        raise _Restart(f"server refused range bytes={have}- (HTTP 416, file size {total})")
    if status >= 500 or status in _RETRY_STATUSES:
        raise _Retry(f"HTTP {status} {response.reason}")
    if 400 <= status < 500:
        error = HTTPStatusError(f"HTTP {status} {response.reason} for {response.url or job.url}")
        error.status = status  # callers tell "not there" (a missing signature) from other failures
        raise error
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        # Sizes, Range offsets and the sha256 are of the file itself: a compressed body matches none of them, and
        # another attempt gets the same. The server must send files as they are.
        raise DownloadError(
            f"{job.url}: the server sent the body with Content-Encoding: {encoding} although only identity was "
            "accepted (Accept-Encoding: identity); sizes and hashes would not match. Configure the server to "
            "serve this file uncompressed, or use another -registry mirror."
        )
    if status == 206:
        content_range = response.headers.get("Content-Range")
        start = content_range_start(content_range)
        if start != have:
            raise _Restart(f"asked for bytes {have}- but the server sent {content_range!r}")
        total = content_range_total(content_range)
    elif status == 200:
        start = 0  # also when our Range was ignored: the body is the whole file again
        length = response.headers.get("Content-Length", "")
        total = int(length) if length.isdigit() else None
    else:
        raise DownloadError(f"unexpected HTTP {status} {response.reason} for {job.url}")
    if total is not None and (total > job.limit or job.exact and total != job.limit):
        remove(job.part)
        raise oversize_error(job, f"declares {total} bytes")
    return start, total


def stream_body(job: _Job, response: requests.Response, start: int, total: int | None) -> int:
    """Write the body into the part from byte ``start``; return the part's size after the body.

    Never writes past ``job.limit``: a body that would is cut, and the part deleted. After every network read the
    deadline and the rate are checked (:class:`_Pace`).
    """
    bar = progress_bar(job.url, total, start) if job.progress else None
    position = start
    pace = _Pace(job, start)
    try:
        with open_part(job.part, "ab" if start else "wb") as out:
            while chunk := read_some(response):
                if position + len(chunk) > job.limit:
                    out.close()
                    remove(job.part)
                    raise oversize_error(job, f"sent more than {job.limit} bytes")
                write_chunk(out, chunk, job.part)
                position += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
                pace.check(position)
    finally:
        if bar is not None:
            bar.close()
    return position


def read_some(response: requests.Response) -> bytes:
    """The body bytes that have arrived (up to :data:`CHUNK`), waiting only until some have.

    ``iter_content`` waits until a whole chunk has arrived, which a server sending a byte every few seconds
    delays without end; ``read1`` returns after one network read. An older urllib3 without it reads whole chunks.
    """
    raw = response.raw
    read1 = getattr(raw, "read1", None)
    data = read1(CHUNK) if read1 is not None else raw.read(CHUNK)
    return bytes(data or b"")


def _transfer_errors() -> tuple[type[Exception], ...]:
    """What urllib3 and http.client raise mid-body when the connection breaks (``read_some`` bypasses the
    translation ``requests`` does in ``iter_content``)."""
    import http.client

    import urllib3.exceptions

    return (urllib3.exceptions.HTTPError, http.client.HTTPException, ConnectionError)


class _Pace:
    """The deadline and the minimum rate of one transfer, checked as its bytes arrive."""

    def __init__(self, job: _Job, position: int) -> None:
        self.job = job
        self.window_start = time.monotonic()
        self.window_bytes = position

    def check(self, position: int) -> None:
        """Raise DownloadError when the deadline has passed or the last window's rate was below the minimum."""
        now = time.monotonic()
        job = self.job
        if job.deadline is not None and now >= job.deadline:
            raise deadline_error(job, f"after {position} bytes")
        elapsed = now - self.window_start
        if elapsed < job.rate_window:
            return
        rate = (position - self.window_bytes) / elapsed
        if rate < job.min_rate:
            # Final for this URL: a trickle is a server's choice, and another attempt would trickle too.
            raise DownloadError(
                f"{job.url}: {position - self.window_bytes} bytes in the last {elapsed:.0f} s ({rate:.0f} B/s), below "
                f"the minimum of {job.min_rate:.0f} B/s; the transfer was stopped (what arrived is kept to resume). "
                "Try again later, or use -registry to pick another mirror."
            )
        self.window_start, self.window_bytes = now, position


def deadline_error(job: _Job, when: str) -> DownloadError:
    """The download ran out of time (:envvar:`SCT_SITEHEAD_DOWNLOAD_TIMEOUT`)."""
    return DownloadError(
        f"{job.url}: the download did not finish within its deadline ({when}); what arrived is kept to resume. "
        "Raise the limit with SCT_SITEHEAD_DOWNLOAD_TIMEOUT (seconds per file), or use -registry to pick a faster "
        "mirror."
    )


def oversize_error(job: _Job, what: str) -> Exception:
    """A body over the cap (or of another size than the registry declares): an integrity failure when the
    registry declared the size, a download failure otherwise."""
    if job.exact:
        return IntegrityError(
            f"{job.url} {what}, but the registry declares {job.limit}; the download was stopped and discarded"
        )
    return DownloadError(f"{job.url} {what}, over the {job.limit}-byte limit; the download was stopped and discarded")


def copy_local(job: _Job) -> None:
    """``Download`` a ``file://`` URL or a plain path by copying it, under the same size rules."""
    parts = urllib.parse.urlsplit(job.url)
    source = Path(urllib.request.url2pathname(parts.path)) if parts.scheme.lower() == "file" else Path(job.url)
    try:
        size = source.stat().st_size
        handle = source.open("rb")
    except OSError as exc:
        raise DownloadError(f"cannot read {source} ({job.url}): {exc.strerror or exc}") from None
    with handle:
        if size > job.limit:
            raise oversize_error(job, f"is {size} bytes")
        with open_part(job.part, "wb") as out:
            copied = 0
            while chunk := handle.read(CHUNK):
                copied += len(chunk)
                if copied > job.limit:  # the file grew while we read it
                    out.close()
                    remove(job.part)
                    raise oversize_error(job, f"grew past {job.limit} bytes")
                write_chunk(out, chunk, job.part)


def content_range_start(value: str | None) -> int | None:
    """First byte of ``Content-Range: bytes START-END/TOTAL``; None if absent or malformed."""
    if value is None:
        return None
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def content_range_total(value: str | None) -> int | None:
    """TOTAL of ``Content-Range: bytes START-END/TOTAL`` or ``bytes */TOTAL``; None if unknown."""
    if value is None:
        return None
    try:
        return int(value.rsplit("/", 1)[1])
    except (IndexError, ValueError):
        return None


def progress_bar(url: str, total: int | None, initial: int) -> tqdm[NoReturn]:
    """A tqdm byte counter on stderr (imported only when a bar is wanted)."""
    from tqdm import tqdm

    name = urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1] or url
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name, file=sys.stderr)


def open_part(part: Path, mode: Literal["ab", "wb"]) -> BinaryIO:
    """Open the partial file, turning a write failure into an OutputError with the fix."""
    try:
        part.parent.mkdir(parents=True, exist_ok=True)
        return part.open(mode)
    except OSError as exc:
        raise OutputError(f"cannot write {part}: {exc.strerror or exc}; check permissions and free space") from None


def write_chunk(out: BinaryIO, chunk: bytes, part: Path) -> None:
    try:
        out.write(chunk)
    except OSError as exc:
        raise OutputError(f"cannot write {part}: {exc.strerror or exc}; check free space") from None


def file_size(path: Path) -> int:
    """Size of the partial file, 0 when there is none yet."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}; check the cache folder") from None


def remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
