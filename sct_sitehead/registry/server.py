"""A static HTTP server for a registry mirror (``sct_sitehead registry serve``), with HTTP Range support.

``http.server.SimpleHTTPRequestHandler`` ignores ``Range``; clients resuming a cut download need it, so
:class:`RangeRequestHandler` answers a single byte range with 206 (or 416 past the end). Multi-range
requests get the whole file (200), which RFC 9110 allows. Serving is plain HTTP: put it behind a TLS
proxy, or have clients on the same trusted network set ``SCT_SITEHEAD_ALLOW_HTTP=1``.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO

from sct_sitehead.errors import UsageError

logger = logging.getLogger(__name__)

_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


class _Slice:
    """A read-only view of ``length`` bytes of an open file, from its current position."""

    def __init__(self, handle: BinaryIO, length: int) -> None:
        self._handle = handle
        self._left = length

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        size = self._left if size < 0 else min(size, self._left)
        data = self._handle.read(size)
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._handle.close()


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``bytes=START-END`` / ``bytes=START-`` / ``bytes=-SUFFIX`` as inclusive ``(start, end)`` clipped to the file.

    Returns:
        None when the header is not a single byte range we understand (the caller then sends the whole file);
        ``(size, size - 1)`` style (start >= size) when the range is unsatisfiable.
    """
    match = _RANGE.match(header)
    if not match:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix: the last N bytes
        suffix = int(last)
        if suffix == 0:
            return size, size - 1
        return max(0, size - suffix), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if last and int(last) < start:
        return None
    return start, end


class RangeRequestHandler(SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler plus single byte-range requests (206/416) and ``Accept-Ranges: bytes``."""

    # The base types its answer as a binary file; the handler only read()s and close()s it, as _Slice allows.
    def send_head(self) -> BinaryIO | _Slice | None:  # type: ignore[override]
        header = self.headers.get("Range")
        path = self.translate_path(self.path)
        if header is None or os.path.isdir(path) or self.path.endswith("/"):
            return super().send_head()
        try:
            handle = open(path, "rb")
        except OSError:
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return None
        try:
            stats = os.fstat(handle.fileno())
            last_modified = self.date_time_string(int(stats.st_mtime))
            if_range = self.headers.get("If-Range")
            requested = parse_range(header, stats.st_size)
            if requested is None or (if_range is not None and if_range.strip() != last_modified):
                handle.close()
                return super().send_head()
            start, end = requested
            if start >= stats.st_size:
                handle.close()
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{stats.st_size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            self.send_response(HTTPStatus.PARTIAL_CONTENT)
            self.send_header("Content-type", self.guess_type(path))
            self.send_header("Content-Range", f"bytes {start}-{end}/{stats.st_size}")
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Last-Modified", last_modified)
            self.end_headers()
            handle.seek(start)
            return _Slice(handle, end - start + 1)
        except BaseException:
            handle.close()
            raise

    def end_headers(self) -> None:
        self.send_header("Accept-Ranges", "bytes")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        logger.info("%s %s", self.address_string(), format % args)


class ThreadingHTTPServerV6(ThreadingHTTPServer):
    """The threading server on an IPv6 address."""

    address_family = socket.AF_INET6


def make_server(
    directory: Path | str,
    port: int = 8000,
    host: str = "127.0.0.1",
    *,
    handler: type[RangeRequestHandler] = RangeRequestHandler,
) -> ThreadingHTTPServer:
    """A bound, not yet running server for ``directory``; port 0 picks a free port (see ``server_address``).

    Raises:
        UsageError: the folder does not exist, or the address cannot be bound (port in use, bad host).
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise UsageError(f"cannot serve {folder}: not a folder")
    server_class = ThreadingHTTPServerV6 if ":" in host else ThreadingHTTPServer
    try:
        return server_class((host, port), partial(handler, directory=str(folder)))
    except OSError as exc:
        reason = exc.strerror or exc
        raise UsageError(f"cannot listen on {host}:{port}: {reason}; pick another -port or -host") from None


def serve(directory: Path, port: int = 8000, host: str = "127.0.0.1") -> None:
    """Serve ``directory`` until interrupted (Ctrl-C raises KeyboardInterrupt to the caller)."""
    server = make_server(directory, port, host)
    logger.info("serving %s on http://%s:%d/", directory, host, server.server_address[1])
    try:
        server.serve_forever()
    finally:
        server.server_close()
