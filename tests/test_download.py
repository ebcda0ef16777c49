"""download(): resume with Range, retries, status handling, size caps, URL policy, local copies; server.py Range.

Two real servers on 127.0.0.1: pytest-httpserver for scripted statuses, and the package's own server.py
(``RecordingServer`` below, which test_cache.py and test_concurrency.py reuse) for cut connections and Range.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from pytest_httpserver import HTTPServer
from werkzeug import Response

from sct_sitehead.errors import DownloadError, IntegrityError, OutputError
from sct_sitehead.registry import download as download_module
from sct_sitehead.registry.download import check_url, download, is_loopback, new_session
from sct_sitehead.registry.server import RangeRequestHandler, make_server, parse_range

FAST = {"retries": 2, "backoff": 0.0, "timeout": (2.0, 2.0)}


class RecordingServer:
    """server.py in a thread, recording every GET (path, Range header) and able to misbehave on request.

    ``cut[path] = n``: the next GET of ``path`` sends its headers (full Content-Length) and only ``n`` body
    bytes, then drops the connection. ``stall[path] = s``: the next GET waits ``s`` seconds before answering.
    ``delay``: every GET waits this long first (widens race windows in the concurrency test).
    """

    def __init__(self, directory: Path) -> None:
        self.requests: list[tuple[str, str | None]] = []
        self.cut: dict[str, int] = {}
        self.stall: dict[str, float] = {}
        self.delay = 0.0
        self._lock = threading.Lock()
        recorder = self

        class Handler(RangeRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                with recorder._lock:
                    recorder.requests.append((path, self.headers.get("Range")))
                    cut = recorder.cut.pop(path, None)
                    stall = recorder.stall.pop(path, 0.0)
                time.sleep(recorder.delay + stall)
                if cut is None:
                    super().do_GET()
                    return
                body = self.send_head()
                if body is None:
                    return
                try:
                    self.wfile.write(body.read(cut))
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                finally:
                    body.close()
                self.close_connection = True

            def log_message(self, format, *args) -> None:
                pass

        self.server = make_server(directory, 0, "127.0.0.1", handler=Handler)
        self.server.handle_error = lambda request, address: None  # cut connections are on purpose
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{path.lstrip('/')}"

    def count(self) -> Counter:
        with self._lock:
            return Counter(path for path, _ in self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def body() -> bytes:
    return os.urandom(300_000)


@pytest.fixture
def served(tmp_path: Path, body: bytes) -> Iterator[RecordingServer]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "file.bin").write_bytes(body)
    server = RecordingServer(root)
    yield server
    server.close()


# --- basic transfers --------------------------------------------------------------------------------------------
def test_cold_download(served: RecordingServer, body: bytes, tmp_path: Path) -> None:
    part = tmp_path / "dl" / "x.part"
    download(served.url("file.bin"), part, expected_size=len(body), max_size=len(body), **FAST)
    assert part.read_bytes() == body
    assert served.requests == [("/file.bin", None)]


def test_existing_part_is_resumed_with_range(served: RecordingServer, body: bytes, tmp_path: Path) -> None:
    part = tmp_path / "x.part"
    part.write_bytes(body[:1000])
    download(served.url("file.bin"), part, expected_size=len(body), max_size=len(body), **FAST)
    assert part.read_bytes() == body
    assert served.requests == [("/file.bin", "bytes=1000-")]


def test_complete_part_makes_no_request(served: RecordingServer, body: bytes, tmp_path: Path) -> None:
    part = tmp_path / "x.part"
    part.write_bytes(body)
    download(served.url("file.bin"), part, expected_size=len(body), max_size=len(body), **FAST)
    assert served.requests == []


def test_cut_connection_resumes_from_what_arrived(served: RecordingServer, body: bytes, tmp_path: Path) -> None:
    served.cut["/file.bin"] = 100_000
    part = tmp_path / "x.part"
    download(served.url("file.bin"), part, expected_size=len(body), max_size=len(body), **FAST)
    assert part.read_bytes() == body
    assert served.requests[0] == ("/file.bin", None)
    assert served.requests[1][1] is not None and served.requests[1][1].startswith("bytes=")
    resumed_from = int(served.requests[1][1].split("=")[1].rstrip("-"))
    assert 0 < resumed_from <= 100_000


def test_cut_connection_of_unknown_expected_size_also_resumes(
    served: RecordingServer, body: bytes, tmp_path: Path
) -> None:
    served.cut["/file.bin"] = 100_000  # over one read chunk, so some bytes reach the file before the cut
    part = tmp_path / "x.part"
    download(served.url("file.bin"), part, expected_size=None, max_size=10**7, **FAST)
    assert part.read_bytes() == body
    assert len(served.requests) == 2 and served.requests[1][1] is not None


def test_read_timeout_is_retried(served: RecordingServer, body: bytes, tmp_path: Path) -> None:
    served.stall["/file.bin"] = 1.0
    part = tmp_path / "x.part"
    download(
        served.url("file.bin"),
        part,
        expected_size=len(body),
        max_size=len(body),
        retries=2,
        backoff=0.0,
        timeout=(2.0, 0.3),
    )
    assert part.read_bytes() == body
    assert len(served.requests) == 2


def test_server_ignoring_range_overwrites_instead_of_appending(
    httpserver: HTTPServer, body: bytes, tmp_path: Path
) -> None:
    httpserver.expect_request("/f").respond_with_data(body)
    part = tmp_path / "x.part"
    part.write_bytes(body[:5000])
    download(httpserver.url_for("/f"), part, expected_size=len(body), max_size=len(body), **FAST)
    assert part.read_bytes() == body
    assert httpserver.log[0][0].headers["Range"] == "bytes=5000-"


def test_416_on_a_complete_part_is_success(httpserver: HTTPServer, body: bytes, tmp_path: Path) -> None:
    headers = {"Content-Range": f"bytes */{len(body)}"}
    httpserver.expect_request("/f").respond_with_data(b"", status=416, headers=headers)
    part = tmp_path / "x.part"
    part.write_bytes(body)
    download(httpserver.url_for("/f"), part, expected_size=None, max_size=10**7, **FAST)
    assert part.read_bytes() == body


def test_416_on_a_wrong_part_restarts_from_zero(served: RecordingServer, body: bytes, tmp_path: Path) -> None:
    part = tmp_path / "x.part"
    part.write_bytes(b"x" * (len(body) + 10))  # longer than the file: the server answers 416
    download(served.url("file.bin"), part, expected_size=None, max_size=10**7, **FAST)
    assert part.read_bytes() == body
    assert served.requests == [("/file.bin", f"bytes={len(body) + 10}-"), ("/file.bin", None)]


# --- statuses and retries ---------------------------------------------------------------------------------------
def test_500_then_200_succeeds(httpserver: HTTPServer, body: bytes, tmp_path: Path) -> None:
    httpserver.expect_ordered_request("/f").respond_with_data("oops", status=500)
    httpserver.expect_ordered_request("/f").respond_with_data(body)
    part = tmp_path / "x.part"
    download(httpserver.url_for("/f"), part, expected_size=len(body), max_size=len(body), **FAST)
    assert part.read_bytes() == body
    assert len(httpserver.log) == 2


def test_persistent_5xx_gives_up_after_the_retries(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/f").respond_with_data("busy", status=503)
    with pytest.raises(DownloadError, match=r"HTTP 503.*gave up after 3 attempts"):
        download(httpserver.url_for("/f"), tmp_path / "x.part", expected_size=10, max_size=10, **FAST)
    assert len(httpserver.log) == 3


def test_backoff_grows_exponentially(httpserver: HTTPServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(download_module.time, "sleep", waits.append)
    httpserver.expect_request("/f").respond_with_data("busy", status=502)
    with pytest.raises(DownloadError):
        download(httpserver.url_for("/f"), tmp_path / "x.part", expected_size=10, max_size=10, retries=3, backoff=1.0)
    assert len(waits) == 3
    assert 0.75 <= waits[0] <= 1.25 and 1.5 <= waits[1] <= 2.5 and 3.0 <= waits[2] <= 5.0


def test_404_fails_at_once_with_status_and_url(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/missing").respond_with_data("no", status=404)
    url = httpserver.url_for("/missing")
    with pytest.raises(DownloadError) as caught:
        download(url, tmp_path / "x.part", expected_size=10, max_size=10, **FAST)
    assert "HTTP 404" in str(caught.value) and url in str(caught.value)
    assert len(httpserver.log) == 1


def test_connection_refused_is_retried_then_reported(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DownloadError, match="connection failed.*gave up after 3 attempts"):
        download(f"http://127.0.0.1:{port}/f", tmp_path / "x.part", expected_size=10, max_size=10, **FAST)


# --- size caps --------------------------------------------------------------------------------------------------
def test_declared_length_over_the_expected_size_is_refused(httpserver: HTTPServer, body: bytes, tmp_path: Path) -> None:
    httpserver.expect_request("/f").respond_with_data(body)
    part = tmp_path / "x.part"
    with pytest.raises(IntegrityError, match=f"declares {len(body)} bytes, but the registry declares 1000"):
        download(httpserver.url_for("/f"), part, expected_size=1000, max_size=10**7, **FAST)
    assert not part.exists()


def test_streamed_body_over_the_size_is_cut_and_never_written(
    httpserver: HTTPServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No Content-Length (chunked): the cap is enforced while streaming, before any byte past it is written."""

    def endless_chunks():
        for _ in range(100):
            yield b"z" * 4096

    httpserver.expect_request("/f").respond_with_response(Response(endless_chunks(), status=200))
    written: list[int] = []
    original = download_module.write_chunk

    def recording_write(out, chunk: bytes, part: Path) -> None:
        original(out, chunk, part)
        written.append(out.tell())

    monkeypatch.setattr(download_module, "write_chunk", recording_write)
    part = tmp_path / "x.part"
    with pytest.raises(IntegrityError, match="sent more than 100000 bytes"):
        download(httpserver.url_for("/f"), part, expected_size=100_000, max_size=10**7, **FAST)
    assert written and max(written) <= 100_000
    assert not part.exists()


def test_max_size_caps_bodies_of_unknown_size(httpserver: HTTPServer, body: bytes, tmp_path: Path) -> None:
    httpserver.expect_request("/f").respond_with_data(body)
    with pytest.raises(DownloadError, match="over the 1000-byte limit"):
        download(httpserver.url_for("/f"), tmp_path / "x.part", expected_size=None, max_size=1000, **FAST)


def test_declared_length_under_the_expected_size_fails_at_once(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/f").respond_with_data(b"abc")
    with pytest.raises(IntegrityError, match="declares 3 bytes, but the registry declares 10"):
        download(httpserver.url_for("/f"), tmp_path / "x.part", expected_size=10, max_size=10, **FAST)
    assert len(httpserver.log) == 1


def test_body_that_keeps_ending_early_fails_after_retries(httpserver: HTTPServer, tmp_path: Path) -> None:
    """Chunked, no length, 5000 of the 10000 declared bytes every time: resumed each time, then given up."""
    httpserver.expect_request("/f").respond_with_handler(lambda request: Response(iter([b"a" * 5000]), status=200))
    part = tmp_path / "x.part"
    with pytest.raises(DownloadError, match=r"body ended after 5000 of 10000 bytes.*gave up after 3 attempts"):
        download(httpserver.url_for("/f"), part, expected_size=10_000, max_size=10**7, **FAST)
    assert [request.headers.get("Range") for request, _ in httpserver.log] == [None, "bytes=5000-", "bytes=5000-"]
    assert part.read_bytes() == b"a" * 5000


# --- URL policy, redirects, proxies -----------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.4.5", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["10.0.0.1", "example.org", "localhost.example.org", "", None, "::2"])
def test_not_loopback_hosts(host) -> None:
    assert not is_loopback(host)


def test_plain_http_to_a_remote_host_is_refused_before_any_connection(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"refusing plain http://.*SCT_SITEHEAD_ALLOW_HTTP=1"):
        download("http://example.org/model.onnx", tmp_path / "x.part", expected_size=10, max_size=10)
    check_url("http://example.org/model.onnx", allow_http=True)
    check_url("https://example.org/model.onnx", allow_http=False)
    check_url("http://127.0.0.1:8000/x", allow_http=False)
    with pytest.raises(DownloadError, match="unsupported scheme 'ftp'"):
        check_url("ftp://example.org/x", allow_http=True)


def test_redirect_on_loopback_is_followed(httpserver: HTTPServer, body: bytes, tmp_path: Path) -> None:
    httpserver.expect_request("/old").respond_with_data("", status=302, headers={"Location": "/new"})
    httpserver.expect_request("/new").respond_with_data(body)
    part = tmp_path / "x.part"
    download(httpserver.url_for("/old"), part, expected_size=len(body), max_size=len(body), **FAST)
    assert part.read_bytes() == body


def test_redirect_to_plain_http_on_another_host_is_refused(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/old").respond_with_data(
        "", status=301, headers={"Location": "http://evil.example.org/x"}
    )
    with pytest.raises(DownloadError, match="refusing plain http:// download http://evil.example.org/x"):
        download(httpserver.url_for("/old"), tmp_path / "x.part", expected_size=10, max_size=10, allow_http=True)
    assert len(httpserver.log) == 1


def test_proxy_variables_are_honoured(httpserver: HTTPServer, body: bytes, tmp_path: Path, monkeypatch) -> None:
    """HTTP_PROXY pointing at the local server: the request for a remote host goes to the proxy, not out."""
    httpserver.expect_request("/model.onnx").respond_with_data(body)
    monkeypatch.setenv("HTTP_PROXY", httpserver.url_for("/"))
    monkeypatch.setenv("NO_PROXY", "")
    part = tmp_path / "x.part"
    download("http://models.example.org/model.onnx", part, expected_size=len(body), max_size=len(body), allow_http=True)
    assert part.read_bytes() == body
    assert new_session().trust_env


# --- local sources, errors writing ------------------------------------------------------------------------------
def test_file_url_and_plain_path_are_copied(tmp_path: Path, body: bytes) -> None:
    source = tmp_path / "dir with space" / "src.bin"
    source.parent.mkdir()
    source.write_bytes(body)
    for location in (source.as_uri(), str(source)):
        part = tmp_path / "x.part"
        part.write_bytes(b"stale")
        download(location, part, expected_size=len(body), max_size=len(body))
        assert part.read_bytes() == body
    with pytest.raises(IntegrityError, match="is 300000 bytes"):
        download(source.as_uri(), tmp_path / "y.part", expected_size=10, max_size=10)
    with pytest.raises(DownloadError, match="cannot read"):
        download((tmp_path / "nope.bin").as_uri(), tmp_path / "z.part", expected_size=10, max_size=10)


def test_unwritable_part_is_an_output_error(served: RecordingServer, body: bytes, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("file")
    with pytest.raises(OutputError, match="cannot write"):
        download(served.url("file.bin"), blocker / "x.part", expected_size=len(body), max_size=len(body), **FAST)


def test_progress_bar_only_when_asked(served: RecordingServer, body: bytes, tmp_path: Path, capsys) -> None:
    download(served.url("file.bin"), tmp_path / "a.part", expected_size=len(body), max_size=len(body), **FAST)
    assert capsys.readouterr().err == ""
    download(
        served.url("file.bin"),
        tmp_path / "b.part",
        expected_size=len(body),
        max_size=len(body),
        progress=True,
        **FAST,
    )
    assert "file.bin" in capsys.readouterr().err


# --- server.py --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-9", (0, 9)),
        ("bytes=10-", (10, 299_999)),
        ("bytes=-10", (299_990, 299_999)),
        ("bytes=5-10000000", (5, 299_999)),
        ("bytes=300000-", (300_000, 299_999)),
        ("bytes=0-1,5-6", None),
        ("items=0-1", None),
        ("bytes=9-3", None),
    ],
)
def test_parse_range(header: str, expected) -> None:
    assert parse_range(header, 300_000) == expected


def test_server_answers_ranges(served: RecordingServer, body: bytes) -> None:
    url = served.url("file.bin")
    partial = requests.get(url, headers={"Range": "bytes=100-199"}, timeout=5)
    assert partial.status_code == 206
    assert partial.content == body[100:200]
    assert partial.headers["Content-Range"] == f"bytes 100-199/{len(body)}"
    suffix = requests.get(url, headers={"Range": "bytes=-50"}, timeout=5)
    assert suffix.status_code == 206 and suffix.content == body[-50:]
    past = requests.get(url, headers={"Range": f"bytes={len(body)}-"}, timeout=5)
    assert past.status_code == 416 and past.headers["Content-Range"] == f"bytes */{len(body)}"
    whole = requests.get(url, timeout=5)
    assert whole.status_code == 200 and whole.content == body and whole.headers["Accept-Ranges"] == "bytes"
    stale = requests.get(url, headers={"Range": "bytes=0-9", "If-Range": "Mon, 01 Jan 2001 00:00:00 GMT"}, timeout=5)
    assert stale.status_code == 200 and stale.content == body
    assert requests.get(served.url("nope.bin"), headers={"Range": "bytes=0-9"}, timeout=5).status_code == 404
    assert requests.get(served.url("../../etc/passwd"), timeout=5).status_code == 404
