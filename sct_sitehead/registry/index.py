"""Load a registry index and resolve ``model@version`` and site names to typed, immutable specs.

An index comes from the package (embedded), a local path, ``file://`` or ``http(s)://``. Remote indexes
are fetched through :mod:`download` with a size cap and their last good copy is kept in the cache, which
is what an offline run reads: offline, nothing touches the network, not even for the index.

Trust (:mod:`trust`): an index with a signature beside it (``registry.json.sig``) is verified before a byte
of it is parsed, and its serial must not go back; a remote index must be signed unless the caller allows
unsigned ones.
"""

from __future__ import annotations

import difflib
import json
import logging
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sct_sitehead import env
from sct_sitehead.errors import (
    DownloadError,
    HTTPStatusError,
    OfflineError,
    RegistryError,
    UnknownModelError,
    UsageError,
)
from sct_sitehead.registry.download import check_url, download, is_remote
from sct_sitehead.registry.schema import validate_index
from sct_sitehead.registry.signing import MAX_SIGNATURE_BYTES, SIGNATURE_SUFFIX
from sct_sitehead.registry.trust import check_signature, remember_index

if TYPE_CHECKING:
    from sct_sitehead.registry.cache import Cache

logger = logging.getLogger(__name__)

MAX_INDEX_BYTES = 16 * 1024 * 1024
INDEX_NAME = "registry.json"
# What a server answers for a file it does not have (403: object stores that hide what exists). A missing
# signature only makes the index unsigned, which is refused unless allowed, so reading these as "absent" is safe.
_ABSENT = frozenset({403, 404, 410})


@dataclass(frozen=True)
class InputSpec:
    """The model grid: orientation (e.g. ``"RAS"``), spacing (mm), patch size (voxels) and normalisation."""

    orientation: str
    spacing: tuple[float, float, float]
    patch_size: tuple[int, int, int]
    divisor: int
    normalization: dict


@dataclass(frozen=True)
class LabelSpec:
    """One output label of a head: its name, the site's label value, and its channel in the shared space."""

    name: str
    value: int
    channel: int


@dataclass(frozen=True)
class Asset:
    """A file to fetch: candidate URLs in order (index location first, then mirrors), size and sha256.

    ``release`` (``"lesion@1.0.0"``) and ``site`` only feed error messages (the command to pre-fetch it).
    """

    name: str
    sha256: str
    size: int
    urls: tuple[str, ...]
    release: str = ""
    site: str | None = None


@dataclass(frozen=True)
class HeadSpec:
    """A site's head: its ONNX file, training strategy, labels, effective threshold and the smallest lesion
    (mm³) its masks keep."""

    site: str
    asset: Asset
    strategy: str
    labels: tuple[LabelSpec, ...]
    threshold: float
    min_lesion_mm3: float = 0.0


@dataclass(frozen=True)
class LocaliserSpec:
    """The cord localiser of a release: a small backbone + head on a coarse grid that finds the cord.

    The lesion model then runs only on the cord's bounding box grown by ``margin_mm``, and lesion probabilities
    further than ``cord_margin_mm`` from the found cord are set to 0.
    """

    input: InputSpec
    backbone: Asset
    head: Asset
    channel: int
    threshold: float
    margin_mm: float
    cord_margin_mm: float


@dataclass(frozen=True)
class Release:
    """One version of a model: the input grid, the shared output space, the backbone and the site heads."""

    model: str
    version: str
    input: InputSpec
    channels: int
    threshold: float
    backbone: Asset
    backbone_outputs: tuple[str, ...]
    heads: dict[str, HeadSpec]
    localiser: LocaliserSpec | None = None

    @property
    def spec(self) -> str:
        """``"lesion@1.0.0"``."""
        return f"{self.model}@{self.version}"

    def head(self, site: str) -> HeadSpec:
        """The head of ``site``.

        Raises:
            UnknownModelError: no such site; the message lists the sites and the nearest name.
        """
        try:
            return self.heads[site]
        except KeyError:
            raise UnknownModelError(
                f"unknown site {site!r} for {self.spec}; sites: {', '.join(sorted(self.heads))}."
                f"{suggest(site, self.heads)}"
            ) from None


class Registry:
    """A validated registry index, the location its relative URLs resolve against, and the id of the key that
    signed it (None: unsigned)."""

    def __init__(self, index: dict[str, Any], location: str, base_url: str, key_id: str | None = None) -> None:
        self.index = index
        self.location = location
        self.key_id = key_id
        self._base_url = base_url

    def __repr__(self) -> str:
        return f"Registry({self.location!r})"

    @classmethod
    def load(
        cls,
        location: str | None,
        *,
        cache: Cache,
        offline: bool,
        allow_http: bool = False,
        trust: list[Path] | None = None,
        allow_unsigned: bool = False,
    ) -> Registry:
        """Read, verify and validate an index.

        Args:
            location: None for the embedded index; a path (a folder means its ``registry.json``),
                ``file://`` URL, or ``http(s)://`` URL.
            cache: where remote indexes are fetched through and their last good copy kept, and where the
                highest serial seen per location is remembered.
            offline: make no network call; a remote index then comes from the cache (and is verified again).
            allow_http: allow plain ``http://`` to hosts other than loopback (also ``SCT_SITEHEAD_ALLOW_HTTP``).
            trust: public key files trusted for this call, on top of the package's and the trusted keys folder's.
            allow_unsigned: accept a remote index that has no signature (a bad signature is never accepted).

        Raises:
            RegistryError: unreadable, invalid, unsupported, refused (plain http), unsigned remote, badly
                signed, signed by an untrusted key, or rolled-back index.
            UsageError: a ``trust`` file is not an ed25519 public key.
            OfflineError: offline and no cached copy of a remote index.
            DownloadError: the remote index cannot be fetched and no copy is cached.
        """
        trust = list(trust or ())
        if location is None:
            return cls.load_local(embedded_registry_path(), cache=cache, trust=trust, embedded=True)
        location = str(location)
        if not is_remote(location):
            return cls.load_local(local_index_path(location), cache=cache, trust=trust)
        allow_http = allow_http or env.allow_plain_http()
        data, signature, fresh = fetch_remote_index(location, cache, offline=offline, allow_http=allow_http)
        key_id = check_signature(
            data,
            signature,
            source=location,
            signature_source=signature_url(location),
            unsigned_ok=allow_unsigned,
            trust=trust,
        )
        if key_id is None:
            logger.warning("using the UNSIGNED registry index %s (allowed by -allow-unsigned)", location)
        index = parse_index(data, location)
        remember_index(cache, location, key_id, index, data)
        if fresh:
            cache.save_index_copy(location, data, signature)
        return cls(index, location, location, key_id)

    @classmethod
    def load_local(cls, path: Path, *, cache: Cache, trust: list[Path], embedded: bool = False) -> Registry:
        """A local index: verified when a signature is beside it, else accepted (the user's own files).

        A signed local index is also checked against the serials seen before from it, except the embedded one:
        it changes only with the package, and downgrading the package is the user's choice.
        """
        data = read_local(path)
        signature = read_local_signature(path)
        key_id = check_signature(data, signature, source=str(path), unsigned_ok=True, trust=trust)
        index = parse_index(data, str(path))
        base_url = path.resolve().as_uri()
        if key_id is not None and not embedded:
            remember_index(cache, base_url, key_id, index, data)
        return cls(index, str(path), base_url, key_id)

    @classmethod
    def from_bytes(cls, data: bytes, location: str, base_url: str) -> Registry:
        """Parse and validate an index's raw bytes (see :func:`parse_index`); no signature is checked."""
        return cls(parse_index(data, location), location, base_url)

    # --- queries ------------------------------------------------------------------------------------------------
    @property
    def default_model(self) -> str | None:
        """The index's ``default_model``, or its only model; None when neither settles it."""
        models = self.index["models"]
        return self.index.get("default_model") or (next(iter(models)) if len(models) == 1 else None)

    @property
    def mirrors(self) -> tuple[str, ...]:
        return tuple(self.index.get("mirrors", ()))

    def models(self) -> list[str]:
        return sorted(self.index["models"])

    def versions(self, model: str) -> list[str]:
        """Versions of ``model``, oldest first (numeric dotted order: 1.10.0 after 1.9.0)."""
        return sorted(self._model(model)["releases"], key=version_key)

    def release(self, model: str | None = None, version: str | None = None) -> Release:
        """Resolve a model (default: the index's default) and version (default: ``latest``, else the highest).

        Raises:
            UnknownModelError: unknown model or version, or no model given and no default.
        """
        if model is None:
            model = self.default_model
            if model is None:
                raise UnknownModelError(
                    f"registry {self.location} has no default_model; choose one with -model NAME "
                    f"(models: {', '.join(self.models())})"
                )
        entry = self._model(model)
        if version is None:
            version = entry.get("latest") or self.versions(model)[-1]
        releases = entry["releases"]
        if version not in releases:
            raise UnknownModelError(
                f"unknown version {version!r} of {model} in registry {self.location}; versions: "
                f"{', '.join(self.versions(model))}.{suggest(version, releases)}"
            )
        return self.build_release(model, version, releases[version])

    def _model(self, model: str) -> dict[str, Any]:
        models = self.index["models"]
        if model not in models:
            raise UnknownModelError(
                f"unknown model {model!r} in registry {self.location}; models: {', '.join(self.models())}."
                f"{suggest(model, models)}"
            )
        return models[model]

    # --- building specs -----------------------------------------------------------------------------------------
    def build_release(self, model: str, version: str, raw: dict[str, Any]) -> Release:
        spec = f"{model}@{version}"
        threshold = float(raw["threshold"])
        heads = {
            site: HeadSpec(
                site=site,
                asset=self.build_asset(f"{site} head", head, release=spec, site=site),
                strategy=head["strategy"],
                labels=tuple(LabelSpec(lab["name"], int(lab["value"]), int(lab["channel"])) for lab in head["labels"]),
                threshold=float(head.get("threshold", threshold)),
                min_lesion_mm3=float(head.get("min_lesion_mm3", 0.0)),
            )
            for site, head in raw["heads"].items()
        }
        localiser = None
        if "localiser" in raw:
            loc = raw["localiser"]
            localiser = LocaliserSpec(
                input=input_spec(loc["input"]),
                backbone=self.build_asset("localiser backbone", loc["backbone"], release=spec),
                head=self.build_asset("localiser head", loc["head"], release=spec),
                channel=int(loc["channel"]),
                threshold=float(loc["threshold"]),
                margin_mm=float(loc["margin_mm"]),
                cord_margin_mm=float(loc["cord_margin_mm"]),
            )
        return Release(
            model=model,
            version=version,
            input=input_spec(raw["input"]),
            channels=int(raw["channels"]),
            threshold=threshold,
            backbone=self.build_asset("backbone", raw["backbone"], release=spec),
            backbone_outputs=tuple(raw["backbone"]["outputs"]),
            heads=heads,
            localiser=localiser,
        )

    def build_asset(self, name: str, raw: dict[str, Any], *, release: str, site: str | None = None) -> Asset:
        return Asset(
            name=name,
            sha256=raw["sha256"],
            size=int(raw["size"]),
            urls=resolve_urls(raw["url"], self._base_url, self.mirrors),
            release=release,
            site=site,
        )


def input_spec(raw: dict[str, Any]) -> InputSpec:
    """An index's ``input`` object (already schema-checked) as an :class:`InputSpec`."""
    return InputSpec(
        orientation=raw["orientation"],
        spacing=tuple(float(v) for v in raw["spacing"]),  # type: ignore[arg-type]
        patch_size=tuple(int(v) for v in raw["patch_size"]),  # type: ignore[arg-type]
        divisor=int(raw["divisor"]),
        normalization=dict(raw["normalization"]),
    )


def resolve_urls(url: str, base_url: str, mirrors: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Candidate URLs for one asset: resolved against the index's location, then each mirror, no duplicates.

    An absolute ``url`` resolves to itself everywhere, so it is the only candidate.

    Raises:
        RegistryError: an index fetched over http(s) points to a local file (``file://``); only a local
            index may, so a remote index cannot make the client read arbitrary local paths.
    """
    bases = [base_url] + [mirror if mirror.endswith("/") else mirror + "/" for mirror in mirrors]
    candidates: list[str] = []
    for base in bases:
        candidate = urllib.parse.urljoin(base, url)
        if is_remote(base_url) and not is_remote(candidate):
            raise RegistryError(
                f"registry index {base_url} points to the local file {candidate}; a remote index may only name "
                "http(s) URLs. Fix the url or mirrors in the index."
            )
        if candidate not in candidates:
            candidates.append(candidate)
    return tuple(candidates)


def parse_model_spec(spec: str | None) -> tuple[str | None, str | None]:
    """``"lesion@1.0.0"`` -> ``("lesion", "1.0.0")``; ``"lesion"`` -> ``("lesion", None)``; ``"@1.0.0"`` ->
    ``(None, "1.0.0")``; None or ``""`` -> ``(None, None)``.

    Raises:
        UsageError: more than one ``@``, or an empty name or version around it.
    """
    if spec is None or not spec.strip():
        return None, None
    spec = spec.strip()
    if spec.count("@") > 1:
        raise UsageError(f"model {spec!r} has more than one '@'; write NAME or NAME@VERSION, e.g. lesion@1.0.0")
    name, _, version = spec.partition("@")
    if "@" in spec and not version:
        raise UsageError(f"model {spec!r} has an empty version after '@'; write NAME or NAME@VERSION")
    return name or None, version or None


def version_key(version: str) -> tuple[int, ...]:
    """Numeric sort key of a dotted version (the schema allows digits and dots only)."""
    return tuple(int(part) for part in version.split("."))


def suggest(name: str, choices: Any) -> str:
    """`` Did you mean 'x'?`` for the nearest choice, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def embedded_registry_path() -> Path:
    """The index shipped with the package: ``sct_sitehead.models/registry.json`` in a wheel, else
    ``<repository>/models/registry.json`` in a source checkout. The path may not exist."""
    from importlib import resources

    try:
        candidate = resources.files("sct_sitehead.models").joinpath(INDEX_NAME)
        if isinstance(candidate, Path) and candidate.is_file():
            return candidate
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2] / "models" / INDEX_NAME


def local_index_path(location: str) -> Path:
    """A plain path or ``file://`` URL as a path; a folder means its ``registry.json``."""
    parts = urllib.parse.urlsplit(location)
    if parts.scheme.lower() == "file":
        path = Path(urllib.request.url2pathname(parts.path))
    else:
        path = Path(location).expanduser()
    return path / INDEX_NAME if path.is_dir() else path


def read_local_signature(index: Path) -> bytes | None:
    """The ``.sig`` beside a local index, None when there is none.

    Raises:
        RegistryError: it exists but cannot be read, or is over the size cap.
    """
    path = index.with_name(index.name + SIGNATURE_SUFFIX)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_SIGNATURE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RegistryError(
            f"cannot read the signature {path} of registry index {index}: {exc.strerror or exc}"
        ) from None
    if len(data) > MAX_SIGNATURE_BYTES:
        raise RegistryError(f"signature file {path} is over the {MAX_SIGNATURE_BYTES}-byte limit; re-create it")
    return data


def signature_url(url: str) -> str:
    """``https://h/r/registry.json?x`` -> ``https://h/r/registry.json.sig?x`` (the query stays on the URL)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=parts.path + SIGNATURE_SUFFIX))


def read_local(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RegistryError(
            f"registry index {path} does not exist; check -registry / SCT_SITEHEAD_REGISTRY, or omit both to use "
            "the embedded index"
        ) from None
    except OSError as exc:
        raise RegistryError(f"cannot read registry index {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_INDEX_BYTES:
        raise RegistryError(f"registry index {path} is {len(data)} bytes, over the {MAX_INDEX_BYTES}-byte limit")
    return data


def parse_index(data: bytes, source: str) -> dict[str, Any]:
    """Decode JSON and validate it (schema, then cross-field rules).

    Raises:
        RegistryError: not UTF-8 JSON, or invalid (see :func:`schema.validate_index`).
    """
    try:
        index = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RegistryError(f"registry index {source} is not UTF-8 text: {exc}") from None
    except json.JSONDecodeError as exc:
        raise RegistryError(
            f"registry index {source} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    validate_index(index, source=f"registry index {source}")
    return index


def fetch_remote_index(url: str, cache: Cache, *, offline: bool, allow_http: bool) -> tuple[bytes, bytes | None, bool]:
    """The index at ``url`` and its signature: downloaded, or the copy kept in the cache when offline.

    Nothing here is trusted yet; the caller verifies the pair (the kept copy too, every time it is used).

    Returns:
        ``(index bytes, signature bytes or None, fresh)``; ``fresh`` is false for the kept copy, used offline or
        with a warning when the download fails.
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


def download_signature(url: str, cache: Cache, *, allow_http: bool) -> bytes | None:
    """The index's ``.sig`` (small size cap), or None when the server has none."""
    try:
        return download_small(signature_url(url), cache, max_size=MAX_SIGNATURE_BYTES, allow_http=allow_http)
    except HTTPStatusError as exc:
        if exc.status in _ABSENT:
            logger.debug("no signature for %s (HTTP %d)", url, exc.status)
            return None
        raise


def download_small(url: str, cache: Cache, *, max_size: int, allow_http: bool) -> bytes:
    """Download a small file (index, signature) into a private temporary folder; never resumed, since it
    changes between releases."""
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
        )
        return part.read_bytes()
