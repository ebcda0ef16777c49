"""What each cached file is: model, version and role (backbone, localiser or site head), by its sha256.

The cache is content-addressed, so a file's own name says nothing about it. The indexes that list it do: the
embedded one and the last good copy of each remote index kept under ``indexes/``. A listing only reads them
(nothing here is trusted or fetched); a copy that cannot be read or parsed names nothing, and a name that is not
a plain registry name (letters, digits, ``_.-``) is left out, so an odd index cannot put control characters on a
terminal.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sct_sitehead.registry import untrusted_json
from sct_sitehead.registry.local import embedded_registry_path

logger = logging.getLogger(__name__)

# The registry schema's pattern for model, site and version names.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
UNKNOWN = "not named by any known index"


def index_paths(cache_root: Path) -> list[Path]:
    """The embedded index, then the kept copies of remote indexes in ``cache_root/indexes`` (sorted)."""
    return [embedded_registry_path(), *sorted((cache_root / "indexes").glob("*.json"))]


def read_index(path: Path) -> dict[str, Any] | None:
    """An index file as a dict, or None (logged at debug level) when it is missing or not JSON."""
    try:
        document = untrusted_json.loads(path.read_bytes(), f"registry index {path}")
    except (OSError, ValueError) as exc:
        logger.debug("cannot read the registry index %s to name cached files: %s", path, exc)
        return None
    return document if isinstance(document, dict) else None


def roles_in_index(index: Mapping[str, Any]) -> dict[str, set[tuple[str, str]]]:
    """Each sha256 an index lists, with the (role, ``model@version``) pairs it fills.

    Roles are ``backbone``, ``localiser backbone``, ``localiser head`` and ``<site> head``, as in the
    registry's own messages. Parts that do not have the index's shape are skipped.
    """
    found: dict[str, set[tuple[str, str]]] = {}

    def add(asset: Any, role: str, spec: str) -> None:
        if isinstance(asset, Mapping) and isinstance(asset.get("sha256"), str):
            found.setdefault(asset["sha256"], set()).add((role, spec))

    for model, entry in _named_items(index.get("models")):
        for version, release in _named_items(entry.get("releases") if isinstance(entry, Mapping) else None):
            if not isinstance(release, Mapping):
                continue
            spec = f"{model}@{version}"
            add(release.get("backbone"), "backbone", spec)
            for site, head in _named_items(release.get("heads")):
                add(head, f"{site} head", spec)
            localiser = release.get("localiser")
            if isinstance(localiser, Mapping):
                add(localiser.get("backbone"), "localiser backbone", spec)
                add(localiser.get("head"), "localiser head", spec)
    return found


def _named_items(value: Any) -> list[tuple[str, Any]]:
    """The items of a mapping whose keys are plain registry names."""
    if not isinstance(value, Mapping):
        return []
    return [(key, item) for key, item in value.items() if isinstance(key, str) and _NAME.fullmatch(key)]


def asset_roles(indexes: Iterable[Mapping[str, Any]]) -> dict[str, set[tuple[str, str]]]:
    """:func:`roles_in_index` over several indexes, merged."""
    merged: dict[str, set[tuple[str, str]]] = {}
    for index in indexes:
        for sha256, roles in roles_in_index(index).items():
            merged.setdefault(sha256, set()).update(roles)
    return merged


def describe_roles(roles: Iterable[tuple[str, str]]) -> str:
    """``{("backbone", "lesion@1.1.2"), ("backbone", "lesion@1.1.3")}`` -> ``backbone of lesion@1.1.2, lesion@1.1.3``.

    Releases are listed by model, then version number; several roles are joined with ``; `` in alphabetical
    order. No role gives :data:`UNKNOWN`.
    """
    by_role: dict[str, list[str]] = {}
    for role, spec in roles:
        by_role.setdefault(role, []).append(spec)
    if not by_role:
        return UNKNOWN
    return "; ".join(
        f"{role} of {', '.join(sorted(specs, key=_spec_order))}" for role, specs in sorted(by_role.items())
    )


def _spec_order(spec: str) -> tuple[str, tuple[int, ...]]:
    """``lesion@1.10.0`` after ``lesion@1.9.0``: model by name, then version by number."""
    model, _, version = spec.partition("@")
    return model, tuple(int(part) for part in version.split(".") if part.isdigit())


def name_cached_assets(cache_root: Path, sha256s: Iterable[str]) -> dict[str, str]:
    """What each of ``sha256s`` is, according to the embedded index and the cached index copies.

    Args:
        cache_root: the cache folder (its ``indexes/`` holds the kept copies of remote indexes).
        sha256s: the cached assets' hashes.

    Returns:
        sha256 -> a description such as ``montreal head of lesion@1.1.3``, or :data:`UNKNOWN`.
    """
    indexes = [index for index in map(read_index, index_paths(cache_root)) if index is not None]
    roles = asset_roles(indexes)
    return {sha256: describe_roles(roles.get(sha256, ())) for sha256 in sha256s}
