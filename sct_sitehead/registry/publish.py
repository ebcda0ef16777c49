"""Publish an exported release into a registry folder that any static HTTP server can serve as is.

The export folder (``sct_sitehead export``) holds ``backbone.onnx``, ``heads/<site>.onnx`` and ``export.json``
(the manifest pieces). Publishing copies the ONNX files to ``<registry>/<model>/<version>/``, adds the release
to ``registry.json`` (creating it if needed), bumps ``serial``, validates the index against the schema, writes
it atomically and, given a key, signs it. No torch needed.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from sct_sitehead.atomic import write_bytes_atomic, write_file_atomic
from sct_sitehead.errors import OutputError, RegistryError, UsageError
from sct_sitehead.registry import untrusted_json
from sct_sitehead.registry.cache import sha256_file
from sct_sitehead.registry.document import INDEX_NAME
from sct_sitehead.registry.index import version_key
from sct_sitehead.registry.schema import validate_index
from sct_sitehead.registry.signing import sign_index
from sct_sitehead.registry.specs import LOCALISER_WINDOWS, WindowSpec

logger = logging.getLogger(__name__)


def read_export(export_dir: Path) -> dict[str, Any]:
    """The export manifest, with every listed file checked against its sha256."""
    manifest_path = export_dir / "export.json"
    try:
        raw = manifest_path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {manifest_path}: {exc}; run `sct_sitehead export` first") from exc
    manifest: dict[str, Any] = untrusted_json.loads(raw, f"export manifest {manifest_path}")
    for entry in [manifest["backbone"], *manifest["heads"].values()]:
        path = export_dir / entry["file"]
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            raise RegistryError(f"{path} is missing or differs from export.json; export again")
    return manifest


def new_index(model: str) -> dict[str, Any]:
    return {"schema_version": 1, "serial": 0, "updated": "", "default_model": model, "models": {}}


def read_index(path: Path, model: str) -> dict[str, Any]:
    if not path.exists():
        return new_index(model)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RegistryError(f"cannot read {path}: {exc}; fix or remove it") from exc
    index: dict[str, Any] = untrusted_json.loads(raw, f"registry index {path}")  # validated below
    validate_index(index, source=str(path))
    return index


def asset_entry(item: dict[str, Any], prefix: str) -> dict[str, Any]:
    """An export manifest's file as a registry asset: url (relative to the index), sha256 and size."""
    return {"url": f"{prefix}/{item['file']}", "sha256": item["sha256"], "size": item["size"]}


def release_entry(
    manifest: dict[str, Any],
    prefix: str,
    *,
    threshold: float,
    head_thresholds: dict[str, float],
    sites: list[str] | None,
    head_min_lesion_mm3: dict[str, float] | None = None,
    date: str,
) -> dict[str, Any]:
    """The registry's release object from an export manifest, asset urls relative to the index; each head keeps
    its ``strategy`` and ``labels``; when the export records the heads' contrasts, the release's ``head_contrasts``
    holds them (at the release level, whose extra keys clients of schema_version 1 accept)."""
    heads: dict[str, Any] = {}
    head_contrasts: dict[str, list[str]] = {}
    for site, head in sorted(manifest["heads"].items()):
        if sites is not None and site not in sites and site != "universal":
            continue
        entry = {**asset_entry(head, prefix), "strategy": head["strategy"], "labels": head["labels"]}
        if site in head_thresholds:
            entry["threshold"] = head_thresholds[site]
        min_lesion_mm3 = (head_min_lesion_mm3 or {}).get(site, 0.0)
        if min_lesion_mm3 > 0:
            entry["min_lesion_mm3"] = min_lesion_mm3
        if head.get("contrasts"):  # an export from checkpoints that predate the field has none
            head_contrasts[site] = list(head["contrasts"])
        heads[site] = entry
    backbone = manifest["backbone"]
    return {
        "date": date,
        "input": manifest["input"],
        "channels": manifest["channels"],
        "threshold": threshold,
        "backbone": {**asset_entry(backbone, prefix), "outputs": backbone["outputs"]},
        "heads": heads,
        **({"head_contrasts": head_contrasts} if head_contrasts else {}),
    }


def localiser_entry(
    manifest: dict[str, Any], prefix: str, *, threshold: float, margin_mm: float, cord_margin_mm: float
) -> dict[str, Any]:
    """The release's ``localiser`` object from the export manifest of a cord localiser (its ``universal`` head).

    Raises:
        RegistryError: the export has no universal head with a ``cord`` label.
    """
    head = manifest["heads"].get("universal")
    channels = [label["channel"] for label in (head or {}).get("labels", []) if label["name"] == "cord"]
    if not channels:
        raise RegistryError("the localiser export needs a universal head with a 'cord' label; train it on cord masks")
    backbone = manifest["backbone"]
    return {
        "input": manifest["input"],
        "backbone": {**asset_entry(backbone, prefix), "outputs": backbone["outputs"]},
        "head": asset_entry(head, prefix),
        "channel": channels[0],
        "threshold": threshold,
        "margin_mm": margin_mm,
        "cord_margin_mm": cord_margin_mm,
    }


def copy_assets(manifest: dict[str, Any], export_dir: Path, target: Path, *, heads: list[str] | None = None) -> None:
    """Copy the ONNX files (the backbone and ``heads``, default all); an identical file in place is left alone."""
    chosen = [h for site, h in manifest["heads"].items() if heads is None or site in heads]
    for entry in [manifest["backbone"], *chosen]:
        source, destination = export_dir / entry["file"], target / entry["file"]
        if destination.is_file() and sha256_file(destination) == entry["sha256"]:
            continue
        write_file_atomic(destination, functools.partial(shutil.copyfile, source))


def publish(
    export_dir: Path,
    registry_dir: Path,
    *,
    model: str,
    version: str,
    threshold: float = 0.5,
    head_thresholds: dict[str, float] | None = None,
    head_min_lesion_mm3: dict[str, float] | None = None,
    sites: list[str] | None = None,
    description: str = "",
    make_default: bool = False,
    replace: bool = False,
    sign_key: Path | None = None,
    localiser: Path | None = None,
    localiser_margin_mm: float = 12.0,
    cord_margin_mm: float = 5.0,
    localiser_windows: WindowSpec = LOCALISER_WINDOWS,
) -> Path:
    """Add ``model@version`` from ``export_dir`` to the registry in ``registry_dir``.

    Args:
        head_thresholds: per-head probability thresholds (default: ``threshold``).
        head_min_lesion_mm3: per-head smallest lesion kept, mm³ (default: every lesion is kept).
        sites: heads to include (``universal`` always is); None for every exported head.
        make_default: make ``model`` the registry's default model.
        replace: allow replacing an already published ``model@version`` whose files differ.
        sign_key: ed25519 private key; the index is signed after writing.
        localiser: export folder of a cord localiser (``train-backbone -config localiser`` then ``export``): the
            lesion model then runs only within ``localiser_margin_mm`` of the cord it finds, and lesions further
            than ``cord_margin_mm`` from that cord are dropped.
        localiser_windows: how the localiser runs over its grid, recorded as the release's ``windows.localiser``.

    Returns:
        The index path.

    Raises:
        RegistryError: the version exists with other files and ``replace`` is False, or the result is invalid.
    """
    manifest = read_export(export_dir)
    index_path = registry_dir / INDEX_NAME
    index = read_index(index_path, model)
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    entry = release_entry(
        manifest,
        f"{model}/{version}",
        threshold=threshold,
        head_thresholds=head_thresholds or {},
        sites=sites,
        date=now.date().isoformat(),
        head_min_lesion_mm3=head_min_lesion_mm3,
    )
    models = index.setdefault("models", {})
    record = models.setdefault(model, {"description": description, "releases": {}})
    if description:
        record["description"] = description
    existing = record["releases"].get(version)
    if existing is not None and not replace and _assets_of(existing) != _assets_of(entry):
        raise RegistryError(
            f"{model}@{version} is already published with other files; publish a new version, or pass replace"
        )
    copy_assets(manifest, export_dir, registry_dir / model / version)
    if localiser is not None:
        loc_manifest = read_export(localiser)
        entry["localiser"] = localiser_entry(
            loc_manifest,
            f"{model}/{version}/localiser",
            threshold=0.5,
            margin_mm=localiser_margin_mm,
            cord_margin_mm=cord_margin_mm,
        )
        entry["windows"] = {"localiser": localiser_windows.as_dict()}
        copy_assets(loc_manifest, localiser, registry_dir / model / version / "localiser", heads=["universal"])
    record["releases"][version] = entry
    record["latest"] = max(record["releases"], key=version_key)
    if make_default or index.get("default_model") not in models:
        index["default_model"] = model
    index["serial"] = int(index.get("serial", 0)) + 1
    index["updated"] = now.isoformat().replace("+00:00", "Z")
    validate_index(index, source=str(index_path))
    try:
        write_bytes_atomic(index_path, (json.dumps(index, indent=2) + "\n").encode("utf-8"))
    except OSError as exc:
        raise OutputError(f"cannot write {index_path}: {exc.strerror}; check permissions and free space") from exc
    if sign_key is not None:
        sign_index(index_path, sign_key)
    elif index_path.with_name(index_path.name + ".sig").exists():
        # A stale signature would make every client refuse the new index.
        index_path.with_name(index_path.name + ".sig").unlink()
        logger.warning("removed the old signature of %s: sign the new index with `registry sign`", index_path)
    logger.info(
        "published %s@%s (%d heads) in %s, serial %d", model, version, len(entry["heads"]), index_path, index["serial"]
    )
    return index_path


def _assets_of(release: dict[str, Any]) -> set[tuple[str, str]]:
    heads = release.get("heads", {})
    assets = {("backbone", release["backbone"]["sha256"])} | {(site, h["sha256"]) for site, h in heads.items()}
    if "localiser" in release:
        loc = release["localiser"]
        assets |= {("localiser backbone", loc["backbone"]["sha256"]), ("localiser head", loc["head"]["sha256"])}
    return assets
