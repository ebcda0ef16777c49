"""Load a registry index and resolve ``model@version`` and site names to typed, immutable specs.

An index comes from the package (embedded), a local path, ``file://`` (:mod:`local`) or ``http(s)://``
(:mod:`remote`: fetched with a size cap, and its last good copy kept in the cache, which is what an offline run
reads: offline, nothing touches the network, not even for the index). Its bytes are parsed by :mod:`document`.

Trust (:mod:`trust`): an index with a signature beside it (``registry.json.sig``) is verified before a byte
of it is parsed, and its serial must not go back; a remote index must be signed unless the caller allows
unsigned ones.
"""

from __future__ import annotations

import logging
import urllib.parse
from pathlib import Path
from typing import Any

from sct_sitehead import env
from sct_sitehead.errors import RegistryError, UnknownModelError, UsageError
from sct_sitehead.registry.cache import Cache
from sct_sitehead.registry.document import parse_index
from sct_sitehead.registry.download import is_remote
from sct_sitehead.registry.local import embedded_registry_path, local_index_path, read_local_index, read_local_signature
from sct_sitehead.registry.remote import fetch_remote_index, signature_url
from sct_sitehead.registry.specs import (
    LOCALISER_WINDOWS,
    Asset,
    HeadSpec,
    LabelSpec,
    LocaliserSpec,
    Release,
    WindowSpec,
    input_spec,
    suggest,
)
from sct_sitehead.registry.trust import check_signature, remember_index

logger = logging.getLogger(__name__)


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
        data = read_local_index(path)
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
        models: dict[str, dict[str, Any]] = self.index["models"]
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
        head_contrasts = raw.get("head_contrasts", {})
        heads = {
            site: HeadSpec(
                site=site,
                asset=self.build_asset(f"{site} head", head, release=spec, site=site),
                strategy=head["strategy"],
                labels=tuple(LabelSpec(lab["name"], int(lab["value"]), int(lab["channel"])) for lab in head["labels"]),
                threshold=float(head.get("threshold", threshold)),
                min_lesion_mm3=float(head.get("min_lesion_mm3", 0.0)),
                contrasts=tuple(head_contrasts[site]) if site in head_contrasts else None,
            )
            for site, head in raw["heads"].items()
        }
        localiser = None
        if "localiser" in raw:
            loc = raw["localiser"]
            windows = raw.get("windows", {})
            localiser = LocaliserSpec(
                input=input_spec(loc["input"]),
                backbone=self.build_asset("localiser backbone", loc["backbone"], release=spec),
                head=self.build_asset("localiser head", loc["head"], release=spec),
                channel=int(loc["channel"]),
                threshold=float(loc["threshold"]),
                margin_mm=float(loc["margin_mm"]),
                cord_margin_mm=float(loc["cord_margin_mm"]),
                windows=WindowSpec.from_mapping(windows["localiser"]) if "localiser" in windows else LOCALISER_WINDOWS,
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
