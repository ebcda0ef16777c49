"""Cache.fetch end to end against a real local server, plus list / verify / clean and hostile inputs."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from pytest_httpserver import HTTPServer
from test_download import RecordingServer
from test_registry import make_index, make_keys, serve_index, sha256, write_registry, write_signed_registry

from sct_sitehead.errors import DownloadError, IntegrityError, OfflineError, OutputError, RegistryError
from sct_sitehead.registry.cache import Cache, sha256_file
from sct_sitehead.registry.index import Registry
from sct_sitehead.registry.specs import Asset, Release

BACKBONE = "lesion/1.0.0/backbone.onnx"
HEAD = "lesion/1.0.0/heads/montreal.onnx"


@dataclass
class Site:
    """A registry folder served over HTTP, and what a client sees of it."""

    server: RecordingServer
    www: Path
    backbone: bytes
    head: bytes
    url: str
    public_key: Path

    def release(self, cache: Cache, offline: bool = False) -> Release:
        return Registry.load(self.url, cache=cache, offline=offline, trust=[self.public_key]).release()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    """A signed registry served over HTTP; the client trusts its key per call."""
    backbone, head = os.urandom(200_000), os.urandom(3_000)
    www = tmp_path / "www"
    private, public = make_keys(tmp_path / "keys")
    write_signed_registry(www, make_index(backbone, {"montreal": head}), {BACKBONE: backbone, HEAD: head}, private)
    server = RecordingServer(www)
    yield Site(server, www, backbone, head, server.url("registry.json"), public)
    server.close()


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(tmp_path / "cache", retries=1, backoff=0.0, timeout=(2.0, 2.0))


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def asset_requests(server: RecordingServer) -> int:
    return sum(n for path, n in server.count().items() if path.endswith(".onnx"))


# --- fetch ------------------------------------------------------------------------------------------------------
def test_cold_download_lands_verified_and_read_only(site: Site, cache: Cache) -> None:
    release = site.release(cache)
    path = cache.fetch(release.backbone, offline=False)
    digest = sha256(site.backbone)
    assert path == cache.root / "assets" / "sha256" / digest[:2] / digest
    assert path.read_bytes() == site.backbone
    assert not stat.S_IMODE(path.stat().st_mode) & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert files_under(cache.root / "tmp") == []
    assert site.server.count()["/" + BACKBONE] == 1


def test_warm_cache_makes_no_asset_request(site: Site, cache: Cache) -> None:
    release = site.release(cache)
    first = [cache.fetch(release.backbone, offline=False), cache.fetch(release.head("montreal").asset, offline=False)]
    before = asset_requests(site.server)
    again = [cache.fetch(release.backbone, offline=False), cache.fetch(release.head("montreal").asset, offline=False)]
    assert again == first
    assert asset_requests(site.server) == before == 2


def test_offline_run_makes_no_request_at_all(site: Site, cache: Cache) -> None:
    """A first, connected run fills the cache; the offline run then uses the cached index and assets only."""
    release = site.release(cache)
    paths = [cache.fetch(release.backbone, offline=False), cache.fetch(release.head("montreal").asset, offline=False)]
    total = len(site.server.requests)
    site.server.close()  # any network call would now fail
    offline_release = site.release(cache, offline=True)
    assert offline_release == release
    assert [
        cache.fetch(offline_release.backbone, offline=True),
        cache.fetch(offline_release.head("montreal").asset, offline=True),
    ] == paths
    assert len(site.server.requests) == total


def test_offline_and_missing_names_the_asset_and_the_fix(site: Site, cache: Cache) -> None:
    release = site.release(cache)
    before = len(site.server.requests)
    with pytest.raises(OfflineError) as caught:
        cache.fetch(release.head("montreal").asset, offline=True)
    message = str(caught.value)
    assert "montreal head of lesion@1.0.0" in message
    assert "sct_sitehead models install lesion@1.0.0 -site montreal" in message
    assert len(site.server.requests) == before
    assert not (cache.root / "locks" / f"{release.head('montreal').asset.sha256}.lock").exists()


def test_corrupted_body_is_an_integrity_error_and_nothing_is_cached(site: Site, cache: Cache) -> None:
    release = site.release(cache)
    (site.www / BACKBONE).write_bytes(bytes(len(site.backbone)))  # right size, wrong bytes
    with pytest.raises(IntegrityError) as caught:
        cache.fetch(release.backbone, offline=False)
    url = site.server.url(BACKBONE)
    assert str(caught.value).startswith(
        f"sha256 of backbone from {url} is {sha256(bytes(len(site.backbone)))}, expected {sha256(site.backbone)}; "
        "the download was discarded. Try again, or use -registry to pick a mirror."
    )
    assert files_under(cache.root / "assets") == []
    assert files_under(cache.root / "tmp") == []


def test_wrong_size_is_an_integrity_error(site: Site, cache: Cache) -> None:
    release = site.release(cache)
    (site.www / BACKBONE).write_bytes(site.backbone + b"extra")
    with pytest.raises(IntegrityError, match="declares 200005 bytes, but the registry declares 200000"):
        cache.fetch(release.backbone, offline=False)
    assert files_under(cache.root / "assets") == []


def test_cut_connection_resumes_with_range(site: Site, cache: Cache) -> None:
    release = site.release(cache)
    site.server.cut["/" + BACKBONE] = 150_000
    path = cache.fetch(release.backbone, offline=False)
    assert path.read_bytes() == site.backbone
    ranges = [header for p, header in site.server.requests if p == "/" + BACKBONE]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")


def test_part_left_by_an_interrupted_run_is_resumed(site: Site, cache: Cache) -> None:
    release = site.release(cache)
    part = cache.root / "tmp" / f"{release.backbone.sha256}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(site.backbone[:120_000])
    assert cache.fetch(release.backbone, offline=False).read_bytes() == site.backbone
    assert [h for p, h in site.server.requests if p == "/" + BACKBONE] == ["bytes=120000-"]


def test_stale_part_with_wrong_bytes_is_downloaded_again_from_scratch(site: Site, cache: Cache) -> None:
    release = site.release(cache)
    part = cache.root / "tmp" / f"{release.backbone.sha256}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 120_000)
    assert cache.fetch(release.backbone, offline=False).read_bytes() == site.backbone
    assert [h for p, h in site.server.requests if p == "/" + BACKBONE] == ["bytes=120000-", None]


def test_500_then_200_succeeds(httpserver: HTTPServer, cache: Cache) -> None:
    data = os.urandom(5000)
    httpserver.expect_ordered_request("/a.onnx").respond_with_data("err", status=500)
    httpserver.expect_ordered_request("/a.onnx").respond_with_data(data)
    asset = Asset("backbone", sha256(data), len(data), (httpserver.url_for("/a.onnx"),))
    assert cache.fetch(asset, offline=False).read_bytes() == data


def test_404_gives_a_download_error_listing_each_url(httpserver: HTTPServer, cache: Cache) -> None:
    httpserver.expect_request("/gone.onnx").respond_with_data("no", status=404)
    httpserver.expect_request("/also.onnx").respond_with_data("no", status=410)
    urls = (httpserver.url_for("/gone.onnx"), httpserver.url_for("/also.onnx"))
    asset = Asset("backbone", "ab" * 32, 10, urls, release="lesion@1.0.0")
    with pytest.raises(DownloadError) as caught:
        cache.fetch(asset, offline=False)
    message = str(caught.value)
    assert message.startswith("could not download backbone of lesion@1.0.0 from any of its 2 URL(s):")
    assert f"{urls[0]}: HTTP 404" in message and f"{urls[1]}: HTTP 410" in message
    assert len(httpserver.log) == 2


def test_mirror_fallback_after_404(httpserver: HTTPServer, tmp_path: Path, cache: Cache) -> None:
    backbone, head = os.urandom(4000), os.urandom(500)
    url = serve_index(httpserver, make_index(backbone, {"x": head}, mirrors=(httpserver.url_for("/mirror/"),)))
    httpserver.expect_request("/reg/" + BACKBONE).respond_with_data("moved", status=404)
    httpserver.expect_request("/mirror/" + BACKBONE).respond_with_data(backbone)
    release = Registry.load(url, cache=cache, offline=False, allow_unsigned=True).release()
    assert release.backbone.urls == (httpserver.url_for("/reg/" + BACKBONE), httpserver.url_for("/mirror/" + BACKBONE))
    assert cache.fetch(release.backbone, offline=False).read_bytes() == backbone


def test_mirror_fallback_after_bad_hash(httpserver: HTTPServer, cache: Cache) -> None:
    data = os.urandom(4000)
    httpserver.expect_request("/bad.onnx").respond_with_data(os.urandom(4000))
    httpserver.expect_request("/good.onnx").respond_with_data(data)
    urls = (httpserver.url_for("/bad.onnx"), httpserver.url_for("/good.onnx"))
    asset = Asset("backbone", sha256(data), len(data), urls)
    assert cache.fetch(asset, offline=False).read_bytes() == data


def test_every_mirror_bad_reports_the_hash_mismatch(httpserver: HTTPServer, cache: Cache) -> None:
    data = os.urandom(4000)
    httpserver.expect_request("/bad.onnx").respond_with_data(os.urandom(4000))
    httpserver.expect_request("/gone.onnx").respond_with_data("no", status=404)
    urls = (httpserver.url_for("/gone.onnx"), httpserver.url_for("/bad.onnx"))
    asset = Asset("backbone", sha256(data), len(data), urls)
    with pytest.raises(IntegrityError, match=r"sha256 of backbone from .*/bad.onnx is [0-9a-f]{64}, expected"):
        cache.fetch(asset, offline=False)
    assert files_under(cache.root / "assets") == []


def test_plain_http_asset_on_a_remote_host_is_refused(cache: Cache) -> None:
    asset = Asset("backbone", "cd" * 32, 10, ("http://models.example.org/backbone.onnx",))
    with pytest.raises(DownloadError, match="refusing plain http://"):
        cache.fetch(asset, offline=False)


# --- hostile names and URLs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../" * 6 + "etc/passwd", "AB" * 32, "ab" * 31, "ab" * 32 + "/../../x", ""])
def test_a_malformed_sha256_never_becomes_a_path(cache: Cache, bad: str) -> None:
    asset = Asset("backbone", bad, 10, ("https://example.org/x",))
    with pytest.raises(RegistryError, match="invalid sha256"):
        cache.fetch(asset, offline=False)
    assert not cache.root.exists()


def test_dot_dot_in_urls_and_names_cannot_write_outside_the_cache(tmp_path: Path) -> None:
    """The index points outside its own folder and names the asset '../../evil'; the file still lands in assets/."""
    data = os.urandom(1000)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(data)
    index = make_index(data, {"x": b"h"}, backbone_url="../../../outside.bin")
    path = write_registry(tmp_path / "a" / "b" / "reg", index)
    cache = Cache(tmp_path / "cache")
    release = Registry.load(str(path), cache=cache, offline=False).release()
    evil = replace(release.backbone, name="../../evil")
    before = {p for p in tmp_path.rglob("*") if not p.is_relative_to(cache.root)}
    result = cache.fetch(evil, offline=False)
    after = {p for p in tmp_path.rglob("*") if not p.is_relative_to(cache.root)}
    assert result.resolve().is_relative_to(cache.root.resolve())
    assert result.read_bytes() == data
    assert after == before
    assert all(p.resolve().is_relative_to(cache.root.resolve()) for p in cache.root.rglob("*"))


# --- read-only caches and lock failures -------------------------------------------------------------------------
def snapshot(folder: Path) -> dict[str, tuple[int, float]]:
    return {str(p): (p.stat().st_mode, p.stat().st_mtime) for p in [folder, *folder.rglob("*")]}


def test_read_only_prefilled_cache_works_without_writing(site: Site, tmp_path: Path) -> None:
    filler = Cache(tmp_path / "ro", retries=0)
    release = site.release(filler)
    expected = [filler.fetch(release.backbone, offline=False)]
    expected.append(filler.fetch(release.head("montreal").asset, offline=False))
    for path in (filler.root / "tmp", filler.root / "locks"):
        os.rename(path, tmp_path / f"removed-{path.name}")  # a copied cache need not carry them
    modes = {p: p.stat().st_mode for p in [filler.root, *filler.root.rglob("*")]}
    for path in modes:
        path.chmod(stat.S_IMODE(modes[path]) & ~0o222)
    try:
        before = snapshot(filler.root)
        reader = Cache(filler.root)
        offline_release = site.release(reader, offline=True)
        got = [
            reader.fetch(offline_release.backbone, offline=True),
            reader.fetch(offline_release.head("montreal").asset, offline=False),
        ]
        assert got == expected
        assert snapshot(filler.root) == before
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


def test_missing_asset_in_an_unwritable_cache_is_a_clear_output_error(site: Site, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    (root / "locks").write_text("not a folder")  # fails for root too, unlike chmod
    cache = Cache(root, retries=0)
    release = site.release(cache)
    with pytest.raises(OutputError, match=r"is not in the cache .* cannot be written .*SCT_SITEHEAD_CACHE"):
        cache.fetch(release.backbone, offline=False)
    assert asset_requests(site.server) == 0


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permission bits do not bind root")
def test_chmod_read_only_cache_without_the_asset_is_an_output_error(site: Site, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    cache = Cache(root, retries=0)
    release = site.release(cache)
    root.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="cannot be written"):
            cache.fetch(release.backbone, offline=False)
    finally:
        root.chmod(0o755)


# --- list, verify, clean ----------------------------------------------------------------------------------------
def fill(site: Site, cache: Cache) -> tuple[Path, Path]:
    release = site.release(cache)
    return cache.fetch(release.backbone, offline=False), cache.fetch(release.head("montreal").asset, offline=False)


def test_list(site: Site, cache: Cache) -> None:
    assert cache.list() == []
    backbone, head = fill(site, cache)
    (cache.root / "assets" / "sha256" / "zz").mkdir()
    (cache.root / "assets" / "sha256" / "zz" / "junk").write_text("x")
    entries = {entry["sha256"]: entry for entry in cache.list()}
    assert entries == {
        sha256(site.backbone): {"sha256": sha256(site.backbone), "size": len(site.backbone), "path": backbone},
        sha256(site.head): {"sha256": sha256(site.head), "size": len(site.head), "path": head},
    }


def test_verify_removes_corrupt_assets(site: Site, cache: Cache) -> None:
    backbone, head = fill(site, cache)
    assert cache.verify() == []
    backbone.chmod(0o644)
    with backbone.open("r+b") as handle:
        handle.write(b"\xff\xfe")
    assert cache.verify() == [backbone]
    assert not backbone.exists() and head.exists()


def test_clean_with_keep_and_everything(site: Site, cache: Cache) -> None:
    backbone, head = fill(site, cache)
    (cache.root / "tmp" / ("ef" * 32 + ".part")).write_bytes(b"12345")
    freed = cache.clean(keep={sha256(site.backbone)})
    assert freed == len(site.head) + 5
    assert backbone.exists() and not head.exists()
    assert cache.index_copy_path(site.url).exists()
    ort = cache.ort_dir()
    (ort / "model.ort").write_bytes(b"123")
    index_size = cache.index_copy_path(site.url).stat().st_size
    index_size += cache.index_signature_copy_path(site.url).stat().st_size
    assert cache.clean() == len(site.backbone) + index_size + 3
    assert cache.list() == [] and list((cache.root / "indexes").iterdir()) == [] and list(ort.iterdir()) == []


def test_clean_leaves_an_asset_whose_lock_another_process_holds(site: Site, cache: Cache) -> None:
    backbone, head = fill(site, cache)
    lock_path = cache.root / "locks" / f"{sha256(site.backbone)}.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, filelock\n"
            "lock = filelock.FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(30)",
            str(lock_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        freed = cache.clean()
        assert backbone.exists() and not head.exists()
        assert freed >= len(site.head)
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.05)
    cache.clean()
    assert not backbone.exists()


def test_ort_dir_is_inside_the_cache(cache: Cache) -> None:
    assert cache.ort_dir() == cache.root / "ort" and cache.ort_dir().is_dir()


def test_default_root_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCT_SITEHEAD_CACHE", str(tmp_path / "envcache"))
    assert Cache().root == tmp_path / "envcache"


def test_offline_still_copies_from_a_local_registry(tmp_path):
    """-offline forbids the network only: the embedded (local) registry's files still enter the cache."""
    from sct_sitehead.registry.cache import Cache
    from sct_sitehead.registry.specs import Asset

    source = tmp_path / "model.onnx"
    source.write_bytes(b"local model bytes")
    import hashlib

    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    local = Asset(name="backbone", sha256=digest, size=source.stat().st_size, urls=(str(source),))
    cache = Cache(tmp_path / "cache")
    assert cache.fetch(local, offline=True).read_bytes() == b"local model bytes"
    remote = Asset(name="head", sha256="0" * 64, size=3, urls=("https://example.org/head.onnx",))
    from sct_sitehead.errors import OfflineError

    with pytest.raises(OfflineError):
        cache.fetch(remote, offline=True)


def test_sha256_file_reads_a_file_of_several_blocks(tmp_path: Path) -> None:
    """Hashed in 1 MiB blocks (Python 3.10 has no hashlib.file_digest): a file of 2.5 blocks, and an empty one."""
    import hashlib

    data = os.urandom(5 << 19)
    (tmp_path / "big").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "big") == hashlib.sha256(data).hexdigest()
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
