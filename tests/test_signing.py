"""Signed registries: key pairs, detached signatures, the trust store, verification before parsing, rollback
protection, and offline re-verification of a cached index."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from pytest_httpserver import HTTPServer
from test_registry import make_index, make_keys, serve_index, sha256, write_registry, write_signed_registry

import sct_sitehead
from sct_sitehead.errors import DownloadError, IntegrityError, RegistryError, UsageError
from sct_sitehead.registry import index as registry_module
from sct_sitehead.registry.cache import Cache
from sct_sitehead.registry.index import Registry
from sct_sitehead.registry.signing import (
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    parse_signature,
    sign_bytes,
    sign_index,
    verify_index_bytes,
)
from sct_sitehead.registry.trust import (
    UNSIGNED,
    Seen,
    canonical_location,
    load_trust_store,
    package_keys,
    rollback_conflict,
)

PROJECT_KEY_ID = "51ea5321b858ff02"


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return make_keys(tmp_path / "keys")


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(tmp_path / "cache", retries=0, backoff=0.0, timeout=(2.0, 2.0))


def signed(index: dict, private: Path, tmp_path: Path) -> tuple[bytes, bytes]:
    """``(index bytes, .sig bytes)`` as a publisher would produce them."""
    path = write_signed_registry(tmp_path / f"pub-{os.urandom(4).hex()}", index, None, private)
    return path.read_bytes(), path.with_name("registry.json.sig").read_bytes()


# --- keys -------------------------------------------------------------------------------------------------------
def test_generate_keypair_writes_a_private_0600_and_a_public_pem(tmp_path: Path) -> None:
    private, public = tmp_path / "k" / "site.pem", tmp_path / "k" / "site.pub"
    identifier = generate_keypair(private, public)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    raw = load_public_key(public).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert identifier == hashlib.sha256(raw).hexdigest()[:16] == key_id(load_private_key(private).public_key())
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["site.pem", "site.pub"]  # no temporary left


def test_generate_keypair_never_overwrites_without_force(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    before = private.read_bytes(), public.read_bytes()
    with pytest.raises(UsageError, match=r"already exists; it was left untouched.*-force"):
        generate_keypair(private, public)
    with pytest.raises(UsageError, match="already exists"):
        generate_keypair(tmp_path / "new.pem", public)
    assert (private.read_bytes(), public.read_bytes()) == before
    assert not (tmp_path / "new.pem").exists()
    new_id = generate_keypair(private, public, force=True)
    assert private.read_bytes() != before[0] and key_id(load_public_key(public)) == new_id
    with pytest.raises(UsageError, match="same file"):
        generate_keypair(tmp_path / "x", tmp_path / "x")


def test_key_loading_errors_say_what_and_how(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    with pytest.raises(UsageError, match="does not exist"):
        load_private_key(tmp_path / "missing.pem")
    with pytest.raises(UsageError, match="not a PEM private key"):
        load_private_key(public)
    with pytest.raises(UsageError, match=r"holds a PRIVATE key; trust only the public key file"):
        load_public_key(private)
    encrypted = tmp_path / "enc.pem"
    encrypted.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
        )
    )
    with pytest.raises(UsageError, match="is encrypted"):
        load_private_key(encrypted)
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("hello")
    with pytest.raises(UsageError, match="not a PEM public key"):
        load_public_key(garbage)


# --- signatures -------------------------------------------------------------------------------------------------
def test_sign_then_verify_round_trip(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    path = write_registry(tmp_path / "reg", make_index(b"bb", {"x": b"h"}))
    sig_path = sign_index(path, private)
    assert sig_path == tmp_path / "reg" / "registry.json.sig"
    signature = json.loads(sig_path.read_text())
    assert set(signature) == {"algorithm", "key_id", "signature"} and signature["algorithm"] == "ed25519"
    assert len(base64.b64decode(signature["signature"])) == 64
    trusted = {key_id(load_public_key(public)): load_public_key(public)}
    assert verify_index_bytes(path.read_bytes(), signature, trusted) == signature["key_id"]


@settings(max_examples=60, deadline=None)
@given(position=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_any_changed_byte_breaks_the_signature(position: int, flip: int) -> None:
    key = Ed25519PrivateKey.generate()
    data = json.dumps(make_index(b"bb", {"x": b"h"})).encode()
    signature = json.loads(sign_bytes(data, key))
    trusted = {key_id(key.public_key()): key.public_key()}
    tampered = bytearray(data)
    tampered[position % len(data)] ^= flip
    with pytest.raises(RegistryError, match="does not match its content"):
        verify_index_bytes(bytes(tampered), signature, trusted)
    with pytest.raises(RegistryError, match="does not match"):
        verify_index_bytes(data + b" ", signature, trusted)


def test_unknown_key_and_forged_key_id(keys: tuple[Path, Path]) -> None:
    private, _ = keys
    data = b'{"schema_version": 1}'
    signature = json.loads(sign_bytes(data, load_private_key(private)))
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(RegistryError, match=rf"signed with key {signature['key_id']}, which is not trusted.*-trust"):
        verify_index_bytes(data, signature, {key_id(other): other})
    forged = {**signature, "key_id": key_id(other)}  # claims to come from the trusted key
    with pytest.raises(RegistryError, match="does not match its content"):
        verify_index_bytes(data, forged, {key_id(other): other})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"not json", "not a JSON object"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"key_id": "XYZ", "signature": "AAAA"}', "key_id 'XYZ'"),
        (b'{"key_id": "0123456789abcdef", "signature": "!!!"}', "no valid signature"),
        (b'{"key_id": "0123456789abcdef", "signature": "AAAA"}', "no valid signature"),
        (b'{"key_id": "0123456789abcdef"}', "no valid signature"),
        (b'{"algorithm": "rsa", "key_id": "0123456789abcdef", "signature": ""}', "algorithm 'rsa'"),
        (b" " * 5000, "over the 4096-byte limit"),
    ],
)
def test_malformed_signature_files_are_refused(raw: bytes, expected: str) -> None:
    with pytest.raises(RegistryError, match=expected):
        parse_signature(raw, source="x.sig")


def test_sign_index_refuses_an_invalid_index_and_warns_without_serial(
    tmp_path: Path, keys: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    private, _ = keys
    index = make_index(b"bb", {"x": b"h"})
    index["schema_version"] = 9
    path = write_registry(tmp_path / "bad", index)
    with pytest.raises(RegistryError, match="schema_version 9"):
        sign_index(path, private)
    assert not (tmp_path / "bad" / "registry.json.sig").exists()
    index = make_index(b"bb", {"x": b"h"})
    del index["serial"]
    with caplog.at_level(logging.WARNING):
        sign_index(write_registry(tmp_path / "noserial", index), private)
    assert "has no serial" in caplog.text


# --- trust store ------------------------------------------------------------------------------------------------
def test_the_package_carries_the_project_public_key_only() -> None:
    shipped = package_keys()
    assert [name for name, _ in shipped] == ["sct_sitehead/registry/keys/sct_sitehead-project.pub"]
    assert all(b"PRIVATE" not in data for _, data in shipped)
    assert PROJECT_KEY_ID in load_trust_store().keys
    repository = Path(sct_sitehead.__file__).resolve().parents[1]
    if (repository / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "-q", ".keys/x.pem"], cwd=repository, check=False)
        assert ignored.returncode == 0, ".keys/ must be git-ignored: it holds the project's private key"


def test_trust_dir_keys_are_added_and_bad_files_skipped(
    tmp_path: Path, keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _, public = keys
    folder = tmp_path / "trusted"
    folder.mkdir()
    (folder / "site.pub").write_bytes(public.read_bytes())
    (folder / "broken.pub").write_text("nonsense")
    (folder / "notes.txt").write_text("ignored: not *.pub")
    monkeypatch.setenv("SCT_SITEHEAD_TRUST_DIR", str(folder))
    with caplog.at_level(logging.WARNING):
        store = load_trust_store()
    assert set(store.keys) == {PROJECT_KEY_ID, key_id(load_public_key(public))}
    assert "skipping trusted key file" in caplog.text and "broken.pub" in caplog.text
    with pytest.raises(UsageError, match="does not exist"):
        load_trust_store([tmp_path / "missing.pub"])


# --- Registry.load: local and embedded --------------------------------------------------------------------------
def test_signed_local_index_verifies_with_a_key_given_per_call(
    tmp_path: Path, keys: tuple[Path, Path], cache: Cache
) -> None:
    private, public = keys
    path = write_signed_registry(tmp_path / "reg", make_index(b"bb", {"x": b"h"}), None, private)
    with pytest.raises(RegistryError, match=r"not trusted here \(trusted: 51ea5321b858ff02"):
        Registry.load(str(path), cache=cache, offline=True)
    registry = Registry.load(str(path), cache=cache, offline=True, trust=[public])
    assert registry.key_id == key_id(load_public_key(public))


def test_a_key_in_the_trust_folder_is_trusted(
    tmp_path: Path, keys: tuple[Path, Path], cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    private, public = keys
    path = write_signed_registry(tmp_path / "reg", make_index(b"bb", {"x": b"h"}), None, private)
    monkeypatch.setenv("SCT_SITEHEAD_TRUST_DIR", str(public.parent))
    assert Registry.load(str(path), cache=cache, offline=True).key_id is not None


def test_the_signature_is_checked_before_the_index_is_parsed(
    tmp_path: Path, keys: tuple[Path, Path], cache: Cache
) -> None:
    """Garbage signed by an untrusted key: the error is about the key, not the JSON, so nothing was parsed."""
    private, _ = keys
    path = tmp_path / "registry.json"
    path.write_bytes(b"{ this is not json")
    (tmp_path / "registry.json.sig").write_bytes(sign_bytes(path.read_bytes(), load_private_key(private)))
    with pytest.raises(RegistryError, match="not trusted here"):
        Registry.load(str(path), cache=cache, offline=True)


def test_a_local_index_changed_after_signing_is_refused(tmp_path: Path, keys: tuple[Path, Path], cache: Cache) -> None:
    private, public = keys
    index = make_index(b"bb", {"x": b"h"})
    path = write_signed_registry(tmp_path / "reg", index, None, private)
    index["models"]["lesion"]["releases"]["1.0.0"]["threshold"] = 0.1
    path.write_text(json.dumps(index))
    with pytest.raises(RegistryError, match=r"does not match its content.*Nothing in it was used"):
        Registry.load(str(path), cache=cache, offline=True, trust=[public])


def test_unsigned_local_and_embedded_indexes_are_accepted_signed_embedded_verified(
    tmp_path: Path, keys: tuple[Path, Path], cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    private, _ = keys
    path = write_registry(tmp_path / "models", make_index(b"bb", {"x": b"h"}))
    assert Registry.load(str(path), cache=cache, offline=True).key_id is None
    monkeypatch.setattr(registry_module, "embedded_registry_path", lambda: path)
    assert Registry.load(None, cache=cache, offline=True).key_id is None
    sign_index(path, private)  # signed by a key the package does not carry: refused, even embedded
    with pytest.raises(RegistryError, match="not trusted"):
        Registry.load(None, cache=cache, offline=True)


# --- Registry.load: remote --------------------------------------------------------------------------------------
def test_unsigned_remote_index_is_refused_unless_allowed(httpserver: HTTPServer, cache: Cache) -> None:
    url = serve_index(httpserver, make_index(b"bb", {"x": b"h"}))
    with pytest.raises(RegistryError) as caught:
        Registry.load(url, cache=cache, offline=False)
    message = str(caught.value)
    assert f"registry index {url} is not signed (no {url}.sig)" in message
    assert "sct_sitehead registry sign" in message and "-allow-unsigned" in message
    assert not cache.index_copy_path(url).exists()
    assert Registry.load(url, cache=cache, offline=False, allow_unsigned=True).key_id is None


def test_signed_remote_index_is_verified_cached_with_its_signature_and_reverified_offline(
    httpserver: HTTPServer, tmp_path: Path, keys: tuple[Path, Path], cache: Cache
) -> None:
    private, public = keys
    data, sig = signed(make_index(b"bb", {"x": b"h"}), private, tmp_path)
    httpserver.expect_request("/reg/registry.json").respond_with_data(data)
    httpserver.expect_request("/reg/registry.json.sig").respond_with_data(sig)
    url = httpserver.url_for("/reg/registry.json")
    assert Registry.load(url, cache=cache, offline=False, trust=[public]).key_id == key_id(load_public_key(public))
    assert cache.read_index_copy(url) == data and cache.read_index_signature_copy(url) == sig
    seen = json.loads(cache.seen_path().read_text())["locations"][canonical_location(url)]
    assert seen == {key_id(load_public_key(public)): {"serial": 1, "updated": None, "sha256": sha256(data)}}
    requests_before = len(httpserver.log)
    assert Registry.load(url, cache=cache, offline=True, trust=[public]).key_id is not None
    assert len(httpserver.log) == requests_before
    # Offline, the copy is verified again: without the key, with its .sig gone, or altered on disk, it is refused.
    with pytest.raises(RegistryError, match="not trusted"):
        Registry.load(url, cache=cache, offline=True)
    cache.index_signature_copy_path(url).unlink()
    with pytest.raises(RegistryError, match="is not signed"):
        Registry.load(url, cache=cache, offline=True, trust=[public])
    cache.save_index_copy(url, data.replace(b'"threshold": 0.5', b'"threshold": 0.1'), sig)
    with pytest.raises(RegistryError, match="does not match its content"):
        Registry.load(url, cache=cache, offline=True, trust=[public])


def test_an_index_altered_in_transit_is_refused_and_the_good_copy_kept(
    httpserver: HTTPServer, tmp_path: Path, keys: tuple[Path, Path], cache: Cache
) -> None:
    private, public = keys
    index = make_index(b"bb", {"x": b"h"})
    data, sig = signed(index, private, tmp_path)
    url = serve_index(httpserver, index, signature=sig)
    Registry.load(url, cache=cache, offline=False, trust=[public])
    evil = make_index(b"evil backbone", {"x": b"h"})
    httpserver.clear_all_handlers()
    serve_index(httpserver, evil, signature=sig)
    with pytest.raises(RegistryError, match="does not match its content"):
        Registry.load(url, cache=cache, offline=False, trust=[public], allow_unsigned=True)
    assert cache.read_index_copy(url) == data
    httpserver.clear_all_handlers()
    serve_index(httpserver, evil)  # and with its signature removed: unsigned, refused without -allow-unsigned
    with pytest.raises(RegistryError, match="is not signed"):
        Registry.load(url, cache=cache, offline=False, trust=[public])


def test_signature_download_failures(httpserver: HTTPServer, tmp_path: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    cache = Cache(tmp_path / "cache", retries=1, backoff=0.0)
    data, sig = signed(make_index(b"bb", {"x": b"h"}), private, tmp_path)
    httpserver.expect_request("/registry.json").respond_with_data(data)
    httpserver.expect_request("/registry.json.sig").respond_with_data(b"{" + b" " * 10_000 + b"}")
    url = httpserver.url_for("/registry.json")
    with pytest.raises(DownloadError, match="over the 4096-byte limit"):
        Registry.load(url, cache=cache, offline=False, trust=[public])
    httpserver.clear_all_handlers()
    httpserver.expect_request("/registry.json").respond_with_data(data)
    httpserver.expect_request("/registry.json.sig").respond_with_data("busy", status=503)
    with pytest.raises(DownloadError, match=r"registry.json.sig: HTTP 503.*gave up after 2 attempts"):
        Registry.load(url, cache=cache, offline=False, trust=[public])
    httpserver.clear_all_handlers()
    httpserver.expect_request("/registry.json").respond_with_data(data)
    httpserver.expect_request("/registry.json.sig").respond_with_data(sig)
    Registry.load(url, cache=cache, offline=False, trust=[public])
    httpserver.clear_all_handlers()
    httpserver.expect_request("/registry.json").respond_with_data(data)
    httpserver.expect_request("/registry.json.sig").respond_with_data("busy", status=503)
    # A failed fetch falls back to the kept copy, which is verified again.
    assert Registry.load(url, cache=cache, offline=False, trust=[public]).key_id is not None


def test_a_mirror_serving_other_bytes_cannot_get_them_cached(
    httpserver: HTTPServer, tmp_path: Path, keys: tuple[Path, Path], cache: Cache
) -> None:
    """The signed index pins each asset by sha256, so a compromised mirror can serve nothing else."""
    private, public = keys
    backbone = os.urandom(5000)
    index = make_index(backbone, {"x": b"h"}, mirrors=(httpserver.url_for("/mirror/"),))
    _, sig = signed(index, private, tmp_path)
    url = serve_index(httpserver, index, signature=sig)
    httpserver.expect_request("/reg/lesion/1.0.0/backbone.onnx").respond_with_data("gone", status=404)
    trojan = os.urandom(5000)
    httpserver.expect_request("/mirror/lesion/1.0.0/backbone.onnx").respond_with_data(trojan)
    release = Registry.load(url, cache=cache, offline=False, trust=[public]).release()
    with pytest.raises(IntegrityError, match=rf"sha256 of backbone from .*/mirror/.* is {sha256(trojan)}"):
        cache.fetch(release.backbone, offline=False)
    assert [p for p in cache.root.rglob("*") if p.is_file() and "assets" in p.parts] == []
    assert not (cache.root / "tmp").exists() or list((cache.root / "tmp").iterdir()) == []


# --- rollback protection ----------------------------------------------------------------------------------------
def test_rollback_and_same_serial_with_other_bytes_are_refused(
    httpserver: HTTPServer, tmp_path: Path, keys: tuple[Path, Path], cache: Cache
) -> None:
    private, public = keys

    def publish(serial: int, threshold: float = 0.5) -> None:
        index = make_index(b"bb", {"x": b"h"}, serial=serial)
        index["updated"] = f"2026-11-{serial:02d}T10:00:00Z"
        index["models"]["lesion"]["releases"]["1.0.0"]["threshold"] = threshold
        _, sig = signed(index, private, tmp_path)
        httpserver.clear_all_handlers()
        serve_index(httpserver, index, signature=sig)

    url = httpserver.url_for("/reg/registry.json")
    publish(5)
    Registry.load(url, cache=cache, offline=False, trust=[public])
    Registry.load(url, cache=cache, offline=False, trust=[public])  # the same index again is fine
    publish(4)
    fresh = Cache(cache.root, retries=0)  # the state lives in the cache, not in the process
    with pytest.raises(RegistryError) as caught:
        Registry.load(url, cache=fresh, offline=False, trust=[public])
    assert "has serial 4 (updated 2026-11-04T10:00:00Z), lower than serial 5 (updated 2026-11-05T10:00:00Z)" in str(
        caught.value
    )
    assert str(cache.seen_path()) in str(caught.value)
    publish(5, threshold=0.2)
    with pytest.raises(RegistryError, match="has serial 5, like the one seen before from it, but other content"):
        Registry.load(url, cache=fresh, offline=False, trust=[public])
    publish(6, threshold=0.2)
    assert Registry.load(url, cache=fresh, offline=False, trust=[public]).release().threshold == 0.2
    publish(5)
    with pytest.raises(RegistryError, match="lower than serial 6"):
        Registry.load(url, cache=fresh, offline=False, trust=[public])


def test_an_unsigned_index_cannot_raise_the_bar_for_signed_ones(
    httpserver: HTTPServer, tmp_path: Path, keys: tuple[Path, Path], cache: Cache
) -> None:
    private, public = keys
    url = serve_index(httpserver, make_index(b"bb", {"x": b"h"}, serial=999))
    Registry.load(url, cache=cache, offline=False, allow_unsigned=True)
    index = make_index(b"bb", {"x": b"h"}, serial=3)
    _, sig = signed(index, private, tmp_path)
    httpserver.clear_all_handlers()
    serve_index(httpserver, index, signature=sig)
    assert Registry.load(url, cache=cache, offline=False, trust=[public]).key_id is not None
    httpserver.clear_all_handlers()
    serve_index(httpserver, make_index(b"bb", {"x": b"h"}, serial=2))  # unsigned, older than the signed one
    with pytest.raises(RegistryError, match=r"\(unsigned\) has serial 2, lower than serial"):
        Registry.load(url, cache=cache, offline=False, allow_unsigned=True)


def test_signed_local_indexes_are_rollback_protected_too(tmp_path: Path, keys: tuple[Path, Path], cache: Cache) -> None:
    private, public = keys
    folder = tmp_path / "reg"
    write_signed_registry(folder, make_index(b"bb", {"x": b"h"}, serial=2), None, private)
    Registry.load(str(folder), cache=cache, offline=True, trust=[public])
    write_signed_registry(folder, make_index(b"bb", {"x": b"h"}, serial=1), None, private)
    with pytest.raises(RegistryError, match="lower than serial 2"):
        Registry.load(str(folder), cache=cache, offline=True, trust=[public])


@pytest.mark.parametrize(
    ("records", "key", "now", "refused_by"),
    [
        ({}, "k1", (1, "a"), None),
        ({"k1": (5, "a")}, "k1", (6, "b"), None),
        ({"k1": (5, "a")}, "k1", (5, "a"), None),
        ({"k1": (5, "a")}, "k1", (4, "c"), 5),
        ({"k1": (5, "a")}, "k1", (5, "b"), 5),
        ({"k1": (5, "a")}, "k2", (4, "c"), 5),  # another trusted key cannot replay an older index either
        ({UNSIGNED: (9, "a")}, "k1", (1, "b"), None),
        ({"k1": (5, "a")}, UNSIGNED, (4, "b"), 5),
        ({"k1": (5, "a"), "k2": (7, "b")}, "k1", (6, "c"), 7),
    ],
)
def test_rollback_decision(records: dict, key: str, now: tuple, refused_by: int | None) -> None:
    seen = {name: Seen(serial, None, digest) for name, (serial, digest) in records.items()}
    conflict = rollback_conflict(seen, key, Seen(now[0], None, now[1]))
    assert (conflict.serial if conflict else None) == refused_by


def test_unreadable_state_is_replaced_and_a_read_only_cache_still_refuses(
    tmp_path: Path, keys: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    private, public = keys
    cache = Cache(tmp_path / "cache")
    folder = tmp_path / "reg"
    cache.seen_path().parent.mkdir(parents=True)
    cache.seen_path().write_text("{ broken")
    write_signed_registry(folder, make_index(b"bb", {"x": b"h"}, serial=2), None, private)
    with caplog.at_level(logging.WARNING):
        Registry.load(str(folder), cache=cache, offline=True, trust=[public])
    assert "ignoring unreadable rollback state" in caplog.text
    assert json.loads(cache.seen_path().read_text())["format"] == 1
    # A cache whose lock folder cannot be made (a file in the way, which stops root too): loads still work,
    # recorded serials are still enforced, new ones are only not remembered.
    shutil.rmtree(cache.root / "locks")
    (cache.root / "locks").write_text("in the way")
    caplog.clear()
    write_signed_registry(folder, make_index(b"bb", {"x": b"h"}, serial=3), None, private)
    with caplog.at_level(logging.WARNING):
        Registry.load(str(folder), cache=cache, offline=True, trust=[public])
    assert "rollback protection will not remember it" in caplog.text
    write_signed_registry(folder, make_index(b"bb", {"x": b"h"}, serial=1), None, private)
    with pytest.raises(RegistryError, match="lower than serial 2"):
        Registry.load(str(folder), cache=cache, offline=True, trust=[public])


# --- import cost ------------------------------------------------------------------------------------------------
def test_unsigned_local_index_does_not_import_cryptography(tmp_path: Path) -> None:
    path = write_registry(tmp_path / "reg", make_index(b"bb", {"x": b"h"}))
    code = (
        "import sys; from sct_sitehead.registry.index import Registry; from sct_sitehead.registry.cache import Cache\n"
        f"Registry.load({str(path)!r}, cache=Cache({str(tmp_path / 'c')!r}), offline=True)\n"
        "assert 'cryptography' not in sys.modules, 'cryptography imported'"
    )
    environment = {**os.environ, "PYTHONPATH": str(Path(sct_sitehead.__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, check=False)
    assert result.returncode == 0, result.stderr
