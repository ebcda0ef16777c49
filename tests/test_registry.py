"""Registry index: schema checks, model/version/site resolution, URL resolution, remote indexes and offline use.

The helpers at the top (``asset_entry``, ``make_index``, ``write_registry``) build small indexes with real
sha256 values; test_cache.py and test_concurrency.py import them.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import jsonschema
import pytest
from pytest_httpserver import HTTPServer

from sct_sitehead.errors import DownloadError, OfflineError, RegistryError, UnknownModelError, UsageError
from sct_sitehead.registry import index as registry_module
from sct_sitehead.registry import remote as remote_module
from sct_sitehead.registry.cache import Cache
from sct_sitehead.registry.index import Registry, parse_model_spec, resolve_urls
from sct_sitehead.registry.local import embedded_registry_path
from sct_sitehead.registry.schema import load_schema, validate_index
from sct_sitehead.registry.signing import generate_keypair, sign_index
from sct_sitehead.registry.specs import Asset, HeadSpec, InputSpec, LabelSpec, NormalizationSpec, Release

BACKBONE_URL = "lesion/1.0.0/backbone.onnx"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def asset_entry(data: bytes, url: str, **extra) -> dict:
    return {"url": url, "sha256": sha256(data), "size": len(data), **extra}


def make_index(
    backbone: bytes,
    heads: dict[str, bytes],
    *,
    version: str = "1.0.0",
    mirrors: tuple[str, ...] = (),
    serial: int = 1,
    backbone_url: str | None = None,
) -> dict:
    """A one-release index; head ``montreal`` (if present) overrides the threshold."""
    head_entries = {}
    for site, data in heads.items():
        entry = asset_entry(
            data,
            f"lesion/{version}/heads/{site}.onnx",
            strategy="finetune",
            labels=[{"name": "lesion", "value": 1, "channel": 1}, {"name": "cord", "value": 1, "channel": 0}],
        )
        if site == "montreal":
            entry["threshold"] = 0.4
        head_entries[site] = entry
    return {
        "schema_version": 1,
        "serial": serial,
        "default_model": "lesion",
        "mirrors": list(mirrors),
        "models": {
            "lesion": {
                "description": "test model",
                "releases": {
                    version: {
                        "date": "2026-11-22",
                        "input": {
                            "orientation": "RAS",
                            "spacing": [1.0, 1.0, 1.0],
                            "patch_size": [64, 64, 64],
                            "divisor": 8,
                            "normalization": {"method": "zscore", "clip_percentiles": [0.5, 99.5]},
                        },
                        "channels": 2,
                        "threshold": 0.5,
                        "backbone": asset_entry(
                            backbone, backbone_url or f"lesion/{version}/backbone.onnx", outputs=["skip0", "dec1"]
                        ),
                        "heads": head_entries,
                    }
                },
            }
        },
    }


def write_registry(root: Path, index: dict, files: dict[str, bytes] | None = None) -> Path:
    """Write ``registry.json`` and the files it points to (relative path -> bytes) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for relative, data in (files or {}).items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    path = root / "registry.json"
    path.write_text(json.dumps(index), encoding="utf-8")
    return path


def make_keys(folder: Path, name: str = "test") -> tuple[Path, Path]:
    """A fresh ed25519 key pair ``(private, public)`` under ``folder``."""
    private, public = folder / f"{name}.pem", folder / f"{name}.pub"
    generate_keypair(private, public)
    return private, public


def write_signed_registry(root: Path, index: dict, files: dict[str, bytes] | None, private_key: Path) -> Path:
    """:func:`write_registry`, then ``registry.json.sig`` beside it."""
    path = write_registry(root, index, files)
    sign_index(path, private_key)
    return path


@pytest.fixture
def index() -> dict:
    return make_index(b"backbone-bytes", {"montreal": b"head-m", "universal": b"head-u"})


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(tmp_path / "cache", retries=0, backoff=0.0)


def load_dict(tmp_path: Path, index: dict, cache: Cache) -> Registry:
    return Registry.load(str(write_registry(tmp_path / "reg", index)), cache=cache, offline=True)


# --- schema -----------------------------------------------------------------------------------------------------
def test_schema_ships_in_the_package_and_is_a_valid_draft_2020_12_schema() -> None:
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_valid_index_passes(index: dict) -> None:
    validate_index(index)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda i: i["models"]["lesion"]["releases"]["1.0.0"]["backbone"].update(sha256="AB" * 32), "64 lowercase"),
        (lambda i: i["models"]["lesion"]["releases"]["1.0.0"]["backbone"].update(sha256="ab" * 31), "backbone/sha256"),
        (lambda i: i["models"]["lesion"]["releases"]["1.0.0"]["heads"]["montreal"].pop("size"), "'size' is a required"),
        (lambda i: i["models"]["lesion"]["releases"]["1.0.0"]["heads"]["montreal"].update(size=0), "montreal/size"),
        (lambda i: i["models"]["lesion"]["releases"]["1.0.0"]["heads"]["montreal"].update(treshold=0.3), "treshold"),
        (lambda i: i["models"]["lesion"]["releases"]["1.0.0"]["input"].update(orientation="RAR"), "orientation"),
        (lambda i: i["models"]["lesion"]["releases"]["1.0.0"]["input"].update(spacing=[1, 1]), "spacing"),
        (lambda i: i["models"]["lesion"]["releases"].update({"v2": {}}), "v2"),
        (lambda i: i["models"]["lesion"]["releases"]["1.0.0"].update(threshold=1.5), "threshold"),
        (
            lambda i: i["models"]["lesion"]["releases"]["1.0.0"]["heads"]["montreal"].update(min_lesion_mm3=-1),
            "min_lesion_mm3",
        ),
        (
            lambda i: i["models"]["lesion"]["releases"]["1.0.0"].update(head_contrasts={"montreal": []}),
            "head_contrasts",
        ),
        (
            lambda i: i["models"]["lesion"]["releases"]["1.0.0"].update(head_contrasts={"montreal": ["T2w", "T2w"]}),
            "head_contrasts",
        ),
        (
            lambda i: i["models"]["lesion"]["releases"]["1.0.0"].update(head_contrasts={"montreal": "T2w"}),
            "head_contrasts",
        ),
        (
            lambda i: i["models"]["lesion"]["releases"]["1.0.0"]["heads"]["montreal"].update(contrasts=["T2w"]),
            "contrasts",
        ),
        (lambda i: i.update(mirrors=["ftp://mirror/"]), "mirrors/0"),
    ],
)
def test_schema_violations_are_reported_with_their_path(index: dict, mutate, expected: str) -> None:
    mutate(index)
    with pytest.raises(RegistryError, match="does not match the registry schema") as caught:
        validate_index(index, source="registry index X")
    assert expected in str(caught.value)


def test_unknown_schema_version_names_the_supported_ones(index: dict) -> None:
    index["schema_version"] = 2
    with pytest.raises(RegistryError, match=r"schema_version 2; this sct_sitehead supports schema_version 1"):
        validate_index(index)
    del index["schema_version"]
    with pytest.raises(RegistryError, match="has no schema_version"):
        validate_index(index)


def test_head_without_lesion_label_is_refused(index: dict) -> None:
    index["models"]["lesion"]["releases"]["1.0.0"]["heads"]["montreal"]["labels"] = [
        {"name": "cord", "value": 1, "channel": 0}
    ]
    with pytest.raises(RegistryError, match=r"heads/montreal has no label named 'lesion' \(labels: cord\)"):
        validate_index(index)


def test_label_channel_must_exist(index: dict) -> None:
    index["models"]["lesion"]["releases"]["1.0.0"]["heads"]["universal"]["labels"][0]["channel"] = 2
    with pytest.raises(RegistryError, match=r"uses channel 2, but the release has 2 channel\(s\) \(0 to 1\)"):
        validate_index(index)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda i: i.update(default_model="lesoin"), "default_model 'lesoin' is not one of its models"),
        (lambda i: i["models"]["lesion"].update(latest="9.9.9"), "latest is '9.9.9'"),
        (lambda i: i["models"]["lesion"]["releases"]["1.0.0"]["input"].update(patch_size=[64, 60, 64]), "divisible"),
    ],
)
def test_cross_field_rules(index: dict, mutate, expected: str) -> None:
    mutate(index)
    with pytest.raises(RegistryError, match=expected):
        validate_index(index)


def test_invalid_json_is_a_registry_error(tmp_path: Path, cache: Cache) -> None:
    path = tmp_path / "registry.json"
    path.write_text('{"schema_version": 1,', encoding="utf-8")
    with pytest.raises(RegistryError, match="not valid JSON"):
        Registry.load(str(path), cache=cache, offline=False)


def test_missing_local_index(tmp_path: Path, cache: Cache) -> None:
    with pytest.raises(RegistryError, match="does not exist"):
        Registry.load(str(tmp_path / "nope.json"), cache=cache, offline=False)


# --- resolution -------------------------------------------------------------------------------------------------
def test_release_is_typed_and_thresholds_resolve(tmp_path: Path, index: dict, cache: Cache) -> None:
    release = load_dict(tmp_path, index, cache).release()
    assert isinstance(release, Release)
    assert (release.model, release.version, release.spec) == ("lesion", "1.0.0", "lesion@1.0.0")
    assert release.input == InputSpec("RAS", (1.0, 1.0, 1.0), (64, 64, 64), 8, NormalizationSpec("zscore", (0.5, 99.5)))
    assert release.channels == 2
    assert release.backbone_outputs == ("skip0", "dec1")
    assert isinstance(release.backbone, Asset) and release.backbone.size == len(b"backbone-bytes")
    montreal = release.head("montreal")
    assert isinstance(montreal, HeadSpec)
    assert montreal.threshold == 0.4
    assert release.head("universal").threshold == 0.5
    assert montreal.min_lesion_mm3 == 0.0  # absent: every lesion is kept
    index["models"]["lesion"]["releases"]["1.0.0"]["heads"]["montreal"]["min_lesion_mm3"] = 12.5
    assert load_dict(tmp_path, index, cache).release().head("montreal").min_lesion_mm3 == 12.5
    assert montreal.labels == (LabelSpec("lesion", 1, 1), LabelSpec("cord", 1, 0))
    assert montreal.asset.release == "lesion@1.0.0" and montreal.asset.site == "montreal"


def test_a_heads_contrasts_are_optional(tmp_path: Path, index: dict, cache: Cache) -> None:
    index["models"]["lesion"]["releases"]["1.0.0"]["head_contrasts"] = {"montreal": ["T2w", "T2star"]}
    release = load_dict(tmp_path, index, cache).release()
    assert release.head("montreal").contrasts == ("T2w", "T2star")
    assert release.head("universal").contrasts is None  # absent: not recorded


def test_head_contrasts_pass_the_schema_of_clients_that_predate_them(index: dict) -> None:
    """An older client's schema has no ``head_contrasts``; the release level accepts extra keys, so an index
    listing them still validates there (a field inside a head would not: heads reject unknown keys)."""
    older = copy.deepcopy(load_schema())
    del older["$defs"]["release"]["properties"]["head_contrasts"]
    release = index["models"]["lesion"]["releases"]["1.0.0"]
    release["head_contrasts"] = {"montreal": ["T2w"]}
    jsonschema.Draft202012Validator(older).validate(index)
    release["heads"]["montreal"]["contrasts"] = ["T2w"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(older).validate(index)


def test_the_shipped_release_without_contrasts_still_loads_and_verifies_signed(tmp_path: Path, cache: Cache) -> None:
    """lesion@1.1.3 was published before heads recorded their contrasts: it stays valid, and a signature made over
    its bytes still verifies (the signature covers the bytes, the schema only what a head may hold)."""
    shipped = embedded_registry_path().read_bytes()
    release = Registry.load(None, cache=cache, offline=True).release("lesion", "1.1.3")
    assert release.heads and all(head.contrasts is None for head in release.heads.values())
    private, public = make_keys(tmp_path)
    copy_path = tmp_path / "signed" / "registry.json"
    copy_path.parent.mkdir()
    copy_path.write_bytes(shipped)
    sign_index(copy_path, private)
    signed = Registry.load(str(copy_path), cache=cache, offline=True, trust=[public])
    assert signed.key_id is not None
    assert all(head.contrasts is None for head in signed.release("lesion", "1.1.3").heads.values())


def test_unknown_site_lists_sites_and_suggests(tmp_path: Path, cache: Cache) -> None:
    index = make_index(b"bb", {"a": b"1", "b": b"2", "montreal": b"3", "universal": b"4"})
    release = load_dict(tmp_path, index, cache).release("lesion", "1.0.0")
    with pytest.raises(UnknownModelError) as caught:
        release.head("montrael")
    assert str(caught.value) == (
        "unknown site 'montrael' for lesion@1.0.0; sites: a, b, montreal, universal. Did you mean 'montreal'?"
    )
    with pytest.raises(UnknownModelError) as caught:
        release.head("zzzzzz")
    assert "Did you mean" not in str(caught.value)


def test_unknown_model_and_version_suggest_the_nearest(tmp_path: Path, index: dict, cache: Cache) -> None:
    registry = load_dict(tmp_path, index, cache)
    with pytest.raises(UnknownModelError, match=r"unknown model 'lesoin'.*models: lesion\. Did you mean 'lesion'\?"):
        registry.release("lesoin")
    with pytest.raises(UnknownModelError, match=r"unknown version '1.0.1' of lesion.*versions: 1\.0\.0\."):
        registry.release("lesion", "1.0.1")
    with pytest.raises(UnknownModelError):
        registry.versions("nope")


def test_versions_sort_numerically_and_latest_wins(tmp_path: Path, cache: Cache) -> None:
    index = make_index(b"bb", {"x": b"h"})
    releases = index["models"]["lesion"]["releases"]
    for version in ("1.9.0", "1.10.0", "0.2"):
        releases[version] = copy.deepcopy(releases["1.0.0"])
    registry = load_dict(tmp_path / "a", index, cache)
    assert registry.versions("lesion") == ["0.2", "1.0.0", "1.9.0", "1.10.0"]
    assert registry.release().version == "1.10.0"
    index["models"]["lesion"]["latest"] = "1.9.0"
    assert load_dict(tmp_path / "b", index, cache).release().version == "1.9.0"


def test_default_model_rules(tmp_path: Path, cache: Cache) -> None:
    index = make_index(b"bb", {"x": b"h"})
    del index["default_model"]
    assert load_dict(tmp_path / "one", index, cache).default_model == "lesion"
    index["models"]["other"] = copy.deepcopy(index["models"]["lesion"])
    registry = load_dict(tmp_path / "two", index, cache)
    assert registry.models() == ["lesion", "other"]
    assert registry.default_model is None
    with pytest.raises(UnknownModelError, match="no default_model"):
        registry.release()
    assert registry.release("other").model == "other"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("lesion@1.0.0", ("lesion", "1.0.0")),
        ("lesion", ("lesion", None)),
        ("@1.0.0", (None, "1.0.0")),
        (" lesion@2 ", ("lesion", "2")),
        ("", (None, None)),
        (None, (None, None)),
    ],
)
def test_parse_model_spec(spec, expected) -> None:
    assert parse_model_spec(spec) == expected


@pytest.mark.parametrize("spec", ["lesion@", "a@b@c"])
def test_parse_model_spec_refuses_malformed(spec: str) -> None:
    with pytest.raises(UsageError):
        parse_model_spec(spec)


def test_relative_urls_resolve_against_the_index_then_mirrors(tmp_path: Path, cache: Cache) -> None:
    index = make_index(b"bb", {"x": b"h"}, mirrors=("https://m1.example/sct", "https://m2.example/base/"))
    registry = load_dict(tmp_path, index, cache)
    urls = registry.release().backbone.urls
    assert urls == (
        (tmp_path / "reg" / BACKBONE_URL).resolve().as_uri(),
        "https://m1.example/sct/" + BACKBONE_URL,
        "https://m2.example/base/" + BACKBONE_URL,
    )


def test_url_resolution_rules() -> None:
    base = "https://host.example/reg/registry.json"
    assert resolve_urls("a/b.onnx", base, []) == ("https://host.example/reg/a/b.onnx",)
    assert resolve_urls("../up.onnx", base, []) == ("https://host.example/up.onnx",)
    absolute = "https://zenodo.example/record/1/backbone.onnx"
    assert resolve_urls(absolute, base, ["https://m.example/"]) == (absolute,)
    assert resolve_urls("x", "https://a.example/r.json", ["https://a.example/"]) == ("https://a.example/x",)


def test_a_remote_index_cannot_point_to_local_files() -> None:
    with pytest.raises(RegistryError, match="points to the local file file:///etc/passwd"):
        resolve_urls("file:///etc/passwd", "https://host.example/registry.json", [])
    with pytest.raises(RegistryError, match="local file"):
        resolve_urls("x.onnx", "https://host.example/registry.json", ["file:///srv/mirror/"])
    assert resolve_urls("file:///srv/x.onnx", "file:///srv/registry.json", []) == ("file:///srv/x.onnx",)


def test_a_folder_location_means_its_registry_json(tmp_path: Path, index: dict, cache: Cache) -> None:
    write_registry(tmp_path / "reg", index)
    for location in (str(tmp_path / "reg"), (tmp_path / "reg").as_uri(), (tmp_path / "reg" / "registry.json").as_uri()):
        registry = Registry.load(location, cache=cache, offline=True)
        assert registry.location == str(tmp_path / "reg" / "registry.json")


def test_embedded_registry(tmp_path: Path, index: dict, cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    path = embedded_registry_path()
    assert path.parts[-2:] == ("models", "registry.json")
    embedded = write_registry(tmp_path / "models", index)
    monkeypatch.setattr(registry_module, "embedded_registry_path", lambda: embedded)
    registry = Registry.load(None, cache=cache, offline=True)
    assert registry.location == str(embedded)
    assert registry.release().backbone.urls[0] == (tmp_path / "models" / BACKBONE_URL).as_uri()
    monkeypatch.setattr(registry_module, "embedded_registry_path", lambda: tmp_path / "missing.json")
    with pytest.raises(RegistryError, match="does not exist"):
        Registry.load(None, cache=cache, offline=True)


# --- remote indexes ---------------------------------------------------------------------------------------------
def serve_index(
    httpserver: HTTPServer, index: dict, path: str = "/reg/registry.json", signature: bytes | None = None
) -> str:
    """Serve ``index`` at ``path``, and ``signature`` (or a 404, i.e. unsigned) at ``path + ".sig"``."""
    httpserver.expect_request(path).respond_with_data(json.dumps(index), content_type="application/json")
    if signature is None:
        httpserver.expect_request(path + ".sig").respond_with_data("no signature", status=404)
    else:
        httpserver.expect_request(path + ".sig").respond_with_data(signature, content_type="application/json")
    return httpserver.url_for(path)


def test_remote_index_is_cached_and_used_offline_without_any_request(
    httpserver: HTTPServer, index: dict, cache: Cache
) -> None:
    url = serve_index(httpserver, index)
    registry = Registry.load(url, cache=cache, offline=False, allow_unsigned=True)
    assert registry.location == url and registry.key_id is None
    assert registry.release().backbone.urls == (httpserver.url_for("/reg/" + BACKBONE_URL),)
    copy_path = cache.root / "indexes" / f"{sha256(url.encode())}.json"
    assert json.loads(copy_path.read_text()) == index
    requests_before = len(httpserver.log)
    httpserver.clear_all_handlers()  # any request now would fail the test with a 500
    offline = Registry.load(url, cache=cache, offline=True, allow_unsigned=True)
    assert offline.index == index
    assert len(httpserver.log) == requests_before


def test_offline_without_a_cached_index_makes_no_request(httpserver: HTTPServer, index: dict, cache: Cache) -> None:
    url = serve_index(httpserver, index)
    with pytest.raises(OfflineError, match="no copy of the registry index"):
        Registry.load(url, cache=cache, offline=True)
    assert len(httpserver.log) == 0


def test_failed_fetch_falls_back_to_the_cached_copy(httpserver: HTTPServer, index: dict, cache: Cache) -> None:
    url = serve_index(httpserver, index)
    Registry.load(url, cache=cache, offline=False, allow_unsigned=True)
    httpserver.clear_all_handlers()
    httpserver.expect_request("/reg/registry.json").respond_with_data("down", status=503)
    assert Registry.load(url, cache=cache, offline=False, allow_unsigned=True).index == index
    with pytest.raises(DownloadError, match="503"):
        Registry.load(httpserver.url_for("/reg/registry.json?other"), cache=cache, offline=False, allow_unsigned=True)


def test_serial_rollback_is_refused(httpserver: HTTPServer, cache: Cache) -> None:
    newer = make_index(b"bb", {"x": b"h"}, serial=5)
    url = serve_index(httpserver, newer)
    Registry.load(url, cache=cache, offline=False, allow_unsigned=True)
    httpserver.clear_all_handlers()
    serve_index(httpserver, make_index(b"bb", {"x": b"h"}, serial=4))
    with pytest.raises(RegistryError, match="serial 4, lower than serial 5"):
        Registry.load(url, cache=cache, offline=False, allow_unsigned=True)


def test_invalid_remote_index_is_not_cached(httpserver: HTTPServer, index: dict, cache: Cache) -> None:
    index["schema_version"] = 7
    url = serve_index(httpserver, index)
    with pytest.raises(RegistryError, match="schema_version 7"):
        Registry.load(url, cache=cache, offline=False, allow_unsigned=True)
    assert not cache.index_copy_path(url).exists()


def test_oversized_remote_index_is_stopped(
    httpserver: HTTPServer, index: dict, cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(remote_module, "MAX_INDEX_BYTES", 100)
    url = serve_index(httpserver, index)
    with pytest.raises(DownloadError, match="over the 100-byte limit"):
        Registry.load(url, cache=cache, offline=False)


def test_plain_http_index_on_a_remote_host_is_refused(cache: Cache) -> None:
    with pytest.raises(RegistryError, match=r"refusing plain http://.*must not travel over plain http"):
        Registry.load("http://registry.example.org/registry.json", cache=cache, offline=False)


def test_allow_http_comes_from_the_environment_too(
    httpserver: HTTPServer, index: dict, cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the proxy set to the local server, an http:// index on another host is fetched only when allowed."""
    serve_index(httpserver, index, path="/registry.json")
    remote = "http://registry.example.org/registry.json"
    monkeypatch.setenv("HTTP_PROXY", httpserver.url_for("/"))
    monkeypatch.setenv("NO_PROXY", "")
    with pytest.raises(RegistryError):
        Registry.load(remote, cache=cache, offline=False, allow_unsigned=True)
    monkeypatch.setenv("SCT_SITEHEAD_ALLOW_HTTP", "1")
    registry = Registry.load(remote, cache=cache, offline=False, allow_unsigned=True)
    assert registry.index == index
    assert [request.path for request, _ in httpserver.log] == ["/registry.json", "/registry.json.sig"]
