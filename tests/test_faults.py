"""Fault injection: a real server on 127.0.0.1 that misbehaves on command, full and read-only disks, killed and
interrupted processes.

Every case ends in success or in one error of the right class (hence exit code), and afterwards the cache
holds only verified files: each file under ``assets/`` has the sha256 of its name, and ``tmp/`` holds nothing
but ``<sha256>.part`` files that are true prefixes of their asset (resumable, never taken as verified).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import default_sigint
from test_registry import make_index, make_keys, write_signed_registry

import sct_sitehead
from sct_sitehead.errors import DownloadError, IntegrityError, OutputError, RegistryError, SiteHeadError
from sct_sitehead.registry import download as download_module
from sct_sitehead.registry.cache import Cache
from sct_sitehead.registry.index import Registry
from sct_sitehead.registry.server import RangeRequestHandler, make_server
from sct_sitehead.registry.signing import load_private_key, sign_bytes
from sct_sitehead.registry.specs import Asset, Release

BACKBONE = "lesion/1.0.0/backbone.onnx"
HEAD = "lesion/1.0.0/heads/montreal.onnx"
COPY = "lesion/1.0.0/copy-of-backbone.onnx"
BACKBONE_SIZE = 1 << 20  # over 10 read chunks, so a cut at 10 % already leaves bytes to resume from
READ_TIMEOUT = 0.4
STALL = 1.0
PYTHONPATH = str(Path(sct_sitehead.__file__).resolve().parents[1])

Fault = Callable[[RangeRequestHandler], None]


# --- a server that misbehaves on command ------------------------------------------------------------------------
class FaultServer:
    """server.py's handler in a thread. ``inject(path, *faults)`` queues faults for the next GETs of ``path``
    (one per request, then normal service); ``throttle = (bytes, seconds)`` slows every body down."""

    def __init__(self, directory: Path, host: str = "127.0.0.1") -> None:
        self.requests: list[tuple[str, str | None]] = []
        self.faults: dict[str, list[Fault]] = {}
        self.throttle: tuple[int, float] | None = None
        self._lock = threading.Lock()
        owner = self

        class Handler(RangeRequestHandler):
            def do_GET(self) -> None:
                parts = urllib.parse.urlsplit(self.path)
                self.path = parts.path + (f"?{parts.query}" if parts.query else "")  # proxied: absolute URL
                with owner._lock:
                    owner.requests.append((parts.path, self.headers.get("Range")))
                    queue = owner.faults.get(parts.path)
                    fault = queue.pop(0) if queue else None
                if fault is None:
                    super().do_GET()
                else:
                    fault(self)

            def copyfile(self, source, outputfile) -> None:
                if owner.throttle is None:
                    super().copyfile(source, outputfile)
                    return
                size, pause = owner.throttle
                while chunk := source.read(size):
                    outputfile.write(chunk)
                    time.sleep(pause)

            def log_message(self, format, *args) -> None:
                pass

        self.server = make_server(directory, 0, host, handler=Handler)
        self.server.handle_error = lambda request, address: None  # clients hanging up are part of the tests
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def inject(self, path: str, *faults: Fault) -> None:
        with self._lock:
            self.faults.setdefault("/" + path.lstrip("/"), []).extend(faults)

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def url(self, path: str) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/{path.lstrip('/')}"

    def ranges(self, path: str) -> list[str | None]:
        with self._lock:
            return [header for requested, header in self.requests if requested == "/" + path.lstrip("/")]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def served_file(handler: RangeRequestHandler) -> bytes:
    return Path(handler.translate_path(handler.path)).read_bytes()


def send(handler: RangeRequestHandler, status: int, headers: dict[str, str], body: bytes = b"") -> None:
    handler.send_response(status)
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)
    handler.wfile.flush()
    handler.close_connection = True


def status(code: int) -> Fault:
    return lambda handler: send(handler, code, {"Content-Length": "6"}, b"failed")


def corrupt() -> Fault:
    """The right length, one byte wrong."""

    def fault(handler: RangeRequestHandler) -> None:
        data = bytearray(served_file(handler))
        data[len(data) // 2] ^= 0xFF
        send(handler, 200, {"Content-Length": str(len(data))}, bytes(data))

    return fault


def cut(fraction: float, *, reset: bool = False) -> Fault:
    """Announce the whole file, send ``fraction`` of it, then close (FIN) or reset (RST) the connection."""

    def fault(handler: RangeRequestHandler) -> None:
        data = served_file(handler)
        send(handler, 200, {"Content-Length": str(len(data))}, data[: int(len(data) * fraction)])
        if reset:
            # Linger 0 makes close() send RST; detach so socketserver cannot send its polite FIN first.
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            os.close(handler.connection.detach())
        else:
            handler.connection.shutdown(socket.SHUT_RDWR)

    return fault


def stall(seconds: float, fraction: float | None = None) -> Fault:
    """Say nothing for ``seconds`` (then answer), or send ``fraction`` of the body and then say nothing."""

    def fault(handler: RangeRequestHandler) -> None:
        if fraction is None:
            time.sleep(seconds)
            RangeRequestHandler.do_GET(handler)
            return
        data = served_file(handler)
        send(handler, 200, {"Content-Length": str(len(data))}, data[: int(len(data) * fraction)])
        time.sleep(seconds)

    return fault


def wrong_length(delta: int) -> Fault:
    """A Content-Length ``delta`` bytes off the file's size, with as much of the file as it announces."""

    def fault(handler: RangeRequestHandler) -> None:
        data = served_file(handler)
        declared = len(data) + delta
        send(handler, 200, {"Content-Length": str(declared)}, data[:declared])

    return fault


def serve(extra: int, *, chunked: bool = False) -> Fault:
    """The file plus ``extra`` bytes: with its (larger) length, or chunked without any length."""

    def fault(handler: RangeRequestHandler) -> None:
        data = served_file(handler) + os.urandom(extra)
        if not chunked:
            send(handler, 200, {"Content-Length": str(len(data))}, data)
            return
        pieces = [data[i : i + 65536] for i in range(0, len(data), 65536)]
        body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"
        send(handler, 200, {"Transfer-Encoding": "chunked"}, body)

    return fault


def redirect(location: str) -> Fault:
    return lambda handler: send(handler, 302, {"Location": location, "Content-Length": "0"})


# --- fixtures and checks ----------------------------------------------------------------------------------------
@dataclass
class Site:
    """A signed registry served by a FaultServer, and the bytes it should deliver."""

    server: FaultServer
    www: Path
    backbone: bytes
    head: bytes
    public_key: Path
    private_key: Path

    @property
    def url(self) -> str:
        return self.server.url("registry.json")

    @property
    def truth(self) -> dict[str, bytes]:
        return {sha(self.backbone): self.backbone, sha(self.head): self.head}

    def release(self, cache: Cache, **options) -> Release:
        return Registry.load(self.url, cache=cache, offline=False, trust=[self.public_key], **options).release()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def payload() -> tuple[bytes, bytes]:
    return os.urandom(BACKBONE_SIZE), os.urandom(20_000)


@pytest.fixture
def site(tmp_path: Path, payload: tuple[bytes, bytes]) -> Iterator[Site]:
    backbone, head = payload
    www = tmp_path / "www"
    private, public = make_keys(tmp_path / "keys")
    files = {BACKBONE: backbone, HEAD: head, COPY: backbone}
    write_signed_registry(www, make_index(backbone, {"montreal": head}), files, private)
    server = FaultServer(www)
    yield Site(server, www, backbone, head, public, private)
    server.close()


def new_cache(root: Path, retries: int = 3) -> Cache:
    return Cache(root, retries=retries, backoff=0.0, timeout=(2.0, READ_TIMEOUT))


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return new_cache(tmp_path / "cache")


def assert_cache_sound(root: Path, truth: dict[str, bytes]) -> None:
    """Only verified files in ``assets/``; in ``tmp/`` only ``<sha256>.part`` files holding a prefix of their
    asset (resumable; a complete one is hashed again before it is moved into ``assets/``)."""
    for path in (root / "assets").rglob("*"):
        if path.is_file():
            assert path.parent.name == path.name[:2] and sha(path.read_bytes()) == path.name, f"unverified {path}"
    for path in (root / "tmp").rglob("*"):
        assert path.is_file() and path.suffix == ".part" and path.stem in truth, f"unexpected {path}"
        assert truth[path.stem].startswith(path.read_bytes()), f"{path} is not a prefix of its asset"


def outcome(action: Callable[[], object]) -> SiteHeadError | None:
    try:
        action()
    except SiteHeadError as exc:
        return exc
    return None


# --- one download against a misbehaving server ------------------------------------------------------------------
FETCH_CASES: dict[str, tuple[list[Fault], type[SiteHeadError] | None]] = {
    "corrupted-bytes": ([corrupt()], IntegrityError),
    "cut-at-10%": ([cut(0.10)], None),
    "cut-at-50%": ([cut(0.50)], None),
    "cut-at-99%": ([cut(0.99)], None),
    "cut-three-times": ([cut(0.2), cut(0.5), cut(0.9)], None),
    "reset-mid-stream": ([cut(0.5, reset=True)], None),
    "stall-before-headers": ([stall(STALL)], None),
    "stall-mid-body": ([stall(STALL, 0.5)], None),
    "stall-every-attempt": ([stall(STALL, 0.3)] * 4, DownloadError),
    "500-502-503-then-ok": ([status(500), status(502), status(503)], None),
    "503-every-attempt": ([status(503)] * 4, DownloadError),
    "404": ([status(404)], DownloadError),
    "403": ([status(403)], DownloadError),
    "content-length-too-long": ([wrong_length(+1000)], IntegrityError),
    "content-length-too-short": ([wrong_length(-1000)], IntegrityError),
    "larger-than-declared": ([serve(5000)], IntegrityError),
    "larger-than-declared-chunked": ([serve(5000, chunked=True)], IntegrityError),
    "redirect-same-server": ([redirect("/" + COPY)], None),
    "redirect-to-plain-http-elsewhere": ([redirect("http://models.example.invalid/backbone.onnx")], DownloadError),
    "redirect-to-file-url": ([redirect("file:///etc/passwd")], DownloadError),
    "redirect-loop": ([redirect("/" + BACKBONE)] * 12, DownloadError),
}


@pytest.mark.parametrize("case", list(FETCH_CASES))
def test_fetch_under_fault(case: str, site: Site, cache: Cache) -> None:
    faults, expected = FETCH_CASES[case]
    release = site.release(cache)
    site.server.inject(BACKBONE, *faults)
    error = outcome(lambda: cache.fetch(release.backbone, offline=False))
    if expected is None:
        assert error is None, error
        assert cache.asset_path(sha(site.backbone)).read_bytes() == site.backbone
    else:
        assert isinstance(error, expected), error
        assert error.exit_code == expected.exit_code
        assert not cache.asset_path(sha(site.backbone)).exists()
    assert_cache_sound(cache.root, site.truth)
    if case.startswith("cut-at"):
        resumed = [header for header in site.server.ranges(BACKBONE) if header]
        assert resumed and int(resumed[0].split("=")[1].rstrip("-")) > 0, site.server.ranges(BACKBONE)
    if case in ("404", "403", "redirect-to-plain-http-elsewhere", "redirect-to-file-url"):
        assert len(site.server.ranges(BACKBONE)) == 1  # not retried
    # The fault is gone: the next run succeeds, resuming whatever verified prefix was kept.
    site.server.clear()
    assert cache.fetch(release.backbone, offline=False).read_bytes() == site.backbone
    assert_cache_sound(cache.root, site.truth)
    assert not (cache.root / "tmp").exists() or list((cache.root / "tmp").iterdir()) == []


INDEX_FETCH_CASES: dict[str, tuple[str, list[Fault], type[SiteHeadError] | None, str]] = {
    "index-cut-at-50%": ("registry.json", [cut(0.5)], None, ""),
    "index-500-502-503-then-ok": ("registry.json", [status(500), status(502), status(503)], None, ""),
    "index-stall": ("registry.json", [stall(STALL)], None, ""),
    "index-corrupted": ("registry.json", [corrupt()], RegistryError, "does not match its content"),
    "index-404": ("registry.json", [status(404)], DownloadError, "HTTP 404"),
    "signature-404": ("registry.json.sig", [status(404)], RegistryError, "is not signed"),
    "signature-corrupted": ("registry.json.sig", [corrupt()], RegistryError, "signature"),
    "signature-503-every-attempt": ("registry.json.sig", [status(503)] * 4, DownloadError, "HTTP 503"),
}


@pytest.mark.parametrize("case", list(INDEX_FETCH_CASES))
def test_index_fetch_under_fault(case: str, site: Site, cache: Cache) -> None:
    """A cold client (no kept copy) fetching the signed index while the server misbehaves."""
    path, faults, expected, message = INDEX_FETCH_CASES[case]
    site.server.inject(path, *faults)
    error = outcome(lambda: site.release(cache))
    if expected is None:
        assert error is None, error
        assert cache.read_index_copy(site.url) == (site.www / "registry.json").read_bytes()
    else:
        assert isinstance(error, expected) and message in str(error), error
        assert cache.read_index_copy(site.url) is None  # nothing unverified is kept for offline use
    site.server.clear()
    assert site.release(cache).spec == "lesion@1.0.0"


def test_redirect_to_another_loopback_host_is_followed(site: Site, cache: Cache) -> None:
    try:
        other = FaultServer(site.www, host="127.0.0.2")
    except SiteHeadError:
        pytest.skip("cannot listen on 127.0.0.2 here")
    try:
        release = site.release(cache)
        site.server.inject(BACKBONE, redirect(other.url(BACKBONE)))
        assert cache.fetch(release.backbone, offline=False).read_bytes() == site.backbone
        assert other.ranges(BACKBONE) == [None]
    finally:
        other.close()
    assert_cache_sound(cache.root, site.truth)


def test_plain_http_redirects_stay_on_the_host_first_asked(
    site: Site, cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through a proxy (the fault server), with plain http allowed: a redirect to another http host is refused
    before any request is made; one on the same host is followed."""
    monkeypatch.setenv("HTTP_PROXY", site.server.url("/"))
    monkeypatch.setenv("NO_PROXY", "")
    asset = Asset("backbone", sha(site.backbone), len(site.backbone), ("http://models.example.org/" + BACKBONE,))
    site.server.inject(BACKBONE, redirect("http://elsewhere.example.org/" + BACKBONE))
    with pytest.raises(DownloadError, match="refusing plain http:// download http://elsewhere.example.org/"):
        cache.fetch(asset, offline=False, allow_http=True)
    assert len(site.server.ranges(BACKBONE)) == 1
    site.server.inject(BACKBONE, redirect("http://models.example.org/" + COPY))
    assert cache.fetch(asset, offline=False, allow_http=True).read_bytes() == site.backbone
    assert site.server.ranges(COPY) == [None]
    assert_cache_sound(cache.root, site.truth)


# --- indexes that point where they must not ---------------------------------------------------------------------
def index_with(site: Site, change: Callable[[dict], None]) -> dict:
    index = make_index(site.backbone, {"montreal": site.head}, serial=2)
    change(index)
    return index


def backbone_entry(index: dict) -> dict:
    return index["models"]["lesion"]["releases"]["1.0.0"]["backbone"]


INDEX_CASES: dict[str, tuple[Callable[[dict], None], type[SiteHeadError] | None, str]] = {
    "url-with-dot-dot": (lambda i: backbone_entry(i).update(url="../../" + COPY), None, ""),
    "sha256-with-dot-dot": (lambda i: backbone_entry(i).update(sha256="../" * 20 + "x"), RegistryError, "sha256"),
    "site-name-with-dot-dot": (
        lambda i: i["models"]["lesion"]["releases"]["1.0.0"]["heads"].update(
            {"../../evil": i["models"]["lesion"]["releases"]["1.0.0"]["heads"]["montreal"]}
        ),
        RegistryError,
        "does not match the registry schema",
    ),
    "absolute-file-url": (lambda i: backbone_entry(i).update(url="file:///etc/passwd"), RegistryError, "local file"),
    "asset-larger-than-declared": (
        lambda i: backbone_entry(i).update(size=BACKBONE_SIZE - 1000),
        IntegrityError,
        f"declares {BACKBONE_SIZE} bytes, but the registry declares {BACKBONE_SIZE - 1000}",
    ),
    "unknown-schema-version": (lambda i: i.update(schema_version=2), RegistryError, "supports schema_version 1"),
}


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_hostile_index(case: str, site: Site, cache: Cache, tmp_path: Path) -> None:
    change, expected, message = INDEX_CASES[case]
    (site.www / "registry.json").write_text(json.dumps(index_with(site, change)))
    sign_unchecked(site.www / "registry.json", site.private_key)
    outside_before = sorted(p for p in tmp_path.rglob("*") if not p.is_relative_to(cache.root))

    def run() -> None:
        cache.fetch(site.release(cache).backbone, offline=False)

    error = outcome(run)
    if expected is None:
        assert error is None, error
    else:
        assert type(error) is expected, error
        assert message in str(error)
    assert sorted(p for p in tmp_path.rglob("*") if not p.is_relative_to(cache.root)) == outside_before
    assert all(p.resolve().is_relative_to(cache.root.resolve()) for p in cache.root.rglob("*"))
    assert_cache_sound(cache.root, site.truth)


def sign_unchecked(path: Path, private_key: Path) -> None:
    """Sign even what ``sign_index`` refuses to (a publisher's bug, or a stolen key): the client must still refuse
    a hostile index after its signature checks out."""
    path.with_name(path.name + ".sig").write_bytes(sign_bytes(path.read_bytes(), load_private_key(private_key)))


# --- many processes, one of them killed -------------------------------------------------------------------------
WORKER = """
import hashlib, json, sys, time
from pathlib import Path
from sct_sitehead.registry.cache import Cache
from sct_sitehead.registry.index import Registry

url, root, go, number, key = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
Path(f"{go}.ready.{number}").touch()
deadline = time.monotonic() + 60
while not go.exists():
    if time.monotonic() > deadline:
        sys.exit("no start signal")
    time.sleep(0.002)
cache = Cache(root, retries=2, backoff=0.05, timeout=(5, 5))
release = Registry.load(url, cache=cache, offline=False, trust=[key]).release()
assets = [release.backbone, release.head("montreal").asset]
if number % 2:
    assets.reverse()
paths = {asset.name: str(cache.fetch(asset, offline=False)) for asset in assets}
print(json.dumps({name: [path, hashlib.sha256(Path(path).read_bytes()).hexdigest()] for name, path in paths.items()}))
"""


def start_workers(site: Site, root: Path, count: int, go: Path) -> list[subprocess.Popen]:
    environment = {**os.environ, "PYTHONPATH": PYTHONPATH}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, site.url, str(root), str(go), str(number), str(site.public_key)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
            preexec_fn=default_sigint,
        )
        for number in range(count)
    ]
    deadline = time.monotonic() + 60
    while len(list(go.parent.glob(go.name + ".ready.*"))) < count:
        assert time.monotonic() < deadline, "workers did not start"
        assert all(worker.poll() is None for worker in workers), [w.communicate() for w in workers if w.poll()]
        time.sleep(0.01)
    return workers


def holder_of(path: Path, workers: list[subprocess.Popen]) -> subprocess.Popen | None:
    """The worker that has ``path`` open (Linux /proc), i.e. the one downloading it."""
    for worker in workers:
        try:
            for fd in os.listdir(f"/proc/{worker.pid}/fd"):
                if os.readlink(f"/proc/{worker.pid}/fd/{fd}") == str(path):
                    return worker
        except OSError:
            continue
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the downloading process through /proc")
@pytest.mark.parametrize("kill_one", [False, True], ids=["8-processes", "8-processes-one-killed"])
def test_processes_on_a_cold_cache(site: Site, tmp_path: Path, kill_one: bool) -> None:
    root = tmp_path / "cache"
    site.server.throttle = (32 * 1024, 0.02)  # about 0.7 s per backbone: the others queue on its lock
    go = tmp_path / "go"
    workers = start_workers(site, root, 8, go)
    victim = None
    try:
        go.touch()
        if kill_one:
            part = root / "tmp" / f"{sha(site.backbone)}.part"
            deadline = time.monotonic() + 30
            while victim is None or not part.exists() or part.stat().st_size < 256 * 1024:
                assert time.monotonic() < deadline, "no download to interrupt"
                victim = victim or holder_of(part, workers)
                time.sleep(0.005)
            victim.send_signal(signal.SIGKILL)
        results = {worker.pid: worker.communicate(timeout=60) for worker in workers}
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    survivors = [worker for worker in workers if worker is not victim]
    for worker in survivors:
        assert worker.returncode == 0, results[worker.pid][1]
    outputs = [json.loads(results[worker.pid][0]) for worker in survivors]
    assert all(output == outputs[0] for output in outputs)
    assert outputs[0]["backbone"][1] == sha(site.backbone) and outputs[0]["montreal head"][1] == sha(site.head)
    assert site.server.ranges(HEAD) == [None]
    if kill_one:
        assert victim.returncode == -signal.SIGKILL
        first, resumed = site.server.ranges(BACKBONE)  # one download, then one resume of the killed one's part
        assert first is None and resumed is not None and int(resumed.split("=")[1].rstrip("-")) > 0
    else:
        assert site.server.ranges(BACKBONE) == [None]
    assert_cache_sound(root, site.truth)
    assert list((root / "tmp").iterdir()) == []


def test_sigint_mid_download_leaves_a_resumable_part(site: Site, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    site.server.throttle = (32 * 1024, 0.02)
    go = tmp_path / "go"
    (worker,) = start_workers(site, root, 1, go)
    part = root / "tmp" / f"{sha(site.backbone)}.part"
    try:
        go.touch()
        deadline = time.monotonic() + 30
        while not part.exists() or part.stat().st_size < 128 * 1024:
            assert time.monotonic() < deadline and worker.poll() is None, worker.communicate()
            time.sleep(0.005)
        worker.send_signal(signal.SIGINT)
        _, err = worker.communicate(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert worker.returncode == -signal.SIGINT and "KeyboardInterrupt" in err
    assert_cache_sound(root, site.truth)
    assert not (root / "assets").exists() or not any(p.is_file() for p in (root / "assets").rglob("*"))
    kept = part.stat().st_size
    site.server.throttle = None
    cache = new_cache(root)
    assert cache.fetch(site.release(cache).backbone, offline=False).read_bytes() == site.backbone
    assert site.server.ranges(BACKBONE)[-1] == f"bytes={kept}-"
    assert_cache_sound(root, site.truth)


# --- a full disk ------------------------------------------------------------------------------------------------
class FullDisk:
    """A file object that takes ``room`` bytes, then fails like a full disk (part of the last chunk lands)."""

    def __init__(self, handle: io.BufferedWriter, room: int) -> None:
        self.handle = handle
        self.room = room

    def write(self, data: bytes) -> int:
        left = self.room - self.handle.tell()
        if len(data) > left:
            self.handle.write(data[: max(left, 0)])
            self.handle.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.handle.write(data)

    def __getattr__(self, name: str):
        return getattr(self.handle, name)

    def __enter__(self) -> FullDisk:
        return self

    def __exit__(self, *exc_info) -> None:
        self.handle.close()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tiny real filesystem (tmpfs, 384 KiB; see :func:`remount`), when this machine lets the tests mount one."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=384k", "tmpfs", str(mount)], capture_output=True, check=False
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def remount(mount: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mount)], check=True)


@pytest.mark.parametrize("where", ["injected-while-writing", "injected-at-fsync", "real-tmpfs"])
def test_full_disk(where: str, site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request) -> None:
    root = request.getfixturevalue("tmpfs") / "cache" if where == "real-tmpfs" else tmp_path / "cache"
    cache = new_cache(root)
    release = site.release(cache)
    if where == "injected-while-writing":
        real_open = download_module.open_part
        monkeypatch.setattr(download_module, "open_part", lambda part, mode: FullDisk(real_open(part, mode), 300_000))
    elif where == "injected-at-fsync":

        def no_space(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OutputError) as caught:
        cache.fetch(release.backbone, offline=False)
    assert caught.value.exit_code == OutputError.exit_code
    assert "No space left on device" in str(caught.value)
    assert not cache.asset_path(sha(site.backbone)).exists()
    if where != "injected-at-fsync":  # there the part is complete and verified, and it stays in tmp/ as a part
        assert_cache_sound(root, site.truth)
    requests_before = len(site.server.ranges(BACKBONE))
    monkeypatch.undo()
    if where == "real-tmpfs":
        remount(root.parent, "size=4m")  # space freed
    assert cache.fetch(release.backbone, offline=False).read_bytes() == site.backbone
    assert_cache_sound(root, site.truth)
    retried = site.server.ranges(BACKBONE)[requests_before:]
    if where == "injected-at-fsync":
        assert retried == []  # the complete part was verified again and moved into place
    else:
        assert len(retried) == 1 and retried[0] is not None  # resumed


# --- a read-only cache ------------------------------------------------------------------------------------------
READ_ONLY_CHECK = """
import json, sys
from pathlib import Path
from sct_sitehead.registry.cache import Cache
from sct_sitehead.errors import SiteHeadError
from sct_sitehead.registry.index import Registry

url, root, key = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
cache = Cache(root, retries=0)
release = Registry.load(url, cache=cache, offline=False, trust=[key]).release()
result = {"backbone": str(cache.fetch(release.backbone, offline=False))}
try:
    cache.fetch(release.head("montreal").asset, offline=False)
    result["head"] = "fetched"
except SiteHeadError as exc:
    result["head"] = [type(exc).__name__, exc.exit_code, str(exc)]
print(json.dumps(result))
"""

_WRITES = {os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_TRUNC, os.O_APPEND}


def inject_read_only(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Every write under ``root`` fails with EROFS, as on a read-only mount."""

    def inside(path) -> bool:
        try:
            return Path(os.fspath(path)).resolve().is_relative_to(root.resolve())
        except TypeError:
            return False  # a file descriptor, not a path

    def refuse(path) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def guard(function: Callable, writes: Callable[..., bool] = lambda *a, **k: True) -> Callable:
        def guarded(path, *args, **kwargs):
            if inside(path) and writes(*args, **kwargs):
                refuse(path)
            return function(path, *args, **kwargs)

        return guarded

    monkeypatch.setattr(os, "open", guard(os.open, lambda flags, *a, **k: any(flags & f for f in _WRITES)))
    monkeypatch.setattr(io, "open", guard(io.open, lambda mode="r", *a, **k: any(c in mode for c in "wax+")))
    for name in ("mkdir", "unlink", "rmdir", "chmod", "replace", "rename", "link"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))


@pytest.mark.parametrize("how", ["injected-erofs", "setpriv-no-capabilities", "tmpfs-remounted-read-only"])
def test_read_only_cache(how: str, site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request) -> None:
    """With the asset present it works and writes nothing; with an asset missing it is one clear OutputError."""
    if how == "setpriv-no-capabilities" and shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    base = request.getfixturevalue("tmpfs") if how == "tmpfs-remounted-read-only" else tmp_path
    if how == "tmpfs-remounted-read-only":
        remount(base, "size=4m")
    root = base / "cache"
    filler = new_cache(root)
    backbone = filler.fetch(site.release(filler).backbone, offline=False)
    shutil.rmtree(root / "tmp")

    def snapshot() -> dict[str, tuple[int, int, float]]:
        return {str(p): (p.stat().st_mode, p.stat().st_size, p.stat().st_mtime) for p in [root, *root.rglob("*")]}

    if how == "setpriv-no-capabilities":
        for path in [root, *root.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
    elif how == "tmpfs-remounted-read-only":
        remount(base, "ro")
    before = snapshot()
    if how == "injected-erofs":
        inject_read_only(monkeypatch, root)
        cache = new_cache(root)
        release = site.release(cache)
        assert cache.fetch(release.backbone, offline=False) == backbone
        with pytest.raises(OutputError) as caught:
            cache.fetch(release.head("montreal").asset, offline=False)
        monkeypatch.undo()
        head_error = [type(caught.value).__name__, caught.value.exit_code, str(caught.value)]
    else:
        # A real process without root's power to ignore permission bits (setpriv), or on a read-only mount.
        command = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"] if how.startswith("setpriv") else []
        result = subprocess.run(
            [*command, sys.executable, "-c", READ_ONLY_CHECK, site.url, str(root), str(site.public_key)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": PYTHONPATH},
            check=False,
        )
        assert result.returncode == 0, result.stderr
        output = json.loads(result.stdout)
        assert output["backbone"] == str(backbone)
        head_error = output["head"]
    after = snapshot()
    if how == "setpriv-no-capabilities":
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert head_error[:2] == ["OutputError", OutputError.exit_code]
    assert "is not in the cache" in head_error[2] and "cannot be written" in head_error[2]
    assert "SCT_SITEHEAD_CACHE" in head_error[2]
    assert after == before
    assert backbone.read_bytes() == site.backbone
    assert_cache_sound(root, site.truth)
