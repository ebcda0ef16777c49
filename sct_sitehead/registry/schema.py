"""Check a registry index: the JSON schema shipped with the package, then the rules a schema cannot express.

The schema (``registry_schema.json``, JSON Schema draft 2020-12) fixes the shape of every field; the code
checks cross-field rules (every head has a ``lesion`` label, label channels exist, ``latest`` and
``default_model`` name real entries) so each failure gets a message that says what to fix.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from sct_sitehead.errors import RegistryError

SUPPORTED_SCHEMA_VERSIONS: tuple[int, ...] = (1,)
SCHEMA_RESOURCE = "registry_schema.json"
LESION_LABEL = "lesion"
#: Largest model file a registry may declare (docs/RELIABILITY.md): ONNX stores a graph in one protobuf, which
#: cannot exceed 2 GiB, so a larger declared size is a broken or hostile index, not a real model. It bounds what a
#: download may write into the cache.
MAX_ASSET_BYTES = 2 << 30

_MAX_REPORTED = 3
_MAX_MESSAGE = 300


@functools.lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """The registry index schema shipped inside the package (``registry_schema.json``)."""
    from importlib import resources

    text = resources.files("sct_sitehead.registry").joinpath(SCHEMA_RESOURCE).read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def validate_index(index: Any, *, source: str = "registry index") -> None:
    """Check a parsed registry index; return quietly when it is usable.

    Args:
        index: the parsed JSON document.
        source: where it came from (path or URL), quoted in messages.

    Raises:
        RegistryError: unsupported ``schema_version``, a schema violation, or a broken cross-field rule.
    """
    check_schema_version(index, source=source)
    check_against_schema(index, source=source)
    check_rules(index, source=source)


def check_schema_version(index: Any, *, source: str) -> None:
    """Refuse an index this version of the package cannot read, before its fields are examined."""
    if not isinstance(index, dict):
        kind = type(index).__name__
        raise RegistryError(f"{source} is not a registry index: its top level is a {kind}, not an object")
    version = index.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS or isinstance(version, bool):
        supported = ", ".join(str(v) for v in SUPPORTED_SCHEMA_VERSIONS)
        found = "has no schema_version" if version is None else f"has schema_version {version!r}"
        raise RegistryError(
            f"{source} {found}; this sct_sitehead supports schema_version {supported}. "
            "Upgrade sct_sitehead (pip install -U sct_sitehead), or point -registry to an index written for a "
            "supported version."
        )


def check_against_schema(index: dict[str, Any], *, source: str) -> None:
    """Validate against ``registry_schema.json``; report the first few violations with their JSON paths."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(index), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    if not errors:
        return
    described = [describe_error(error) for error in errors[:_MAX_REPORTED]]
    more = f" (and {len(errors) - _MAX_REPORTED} more)" if len(errors) > _MAX_REPORTED else ""
    raise RegistryError(f"{source} does not match the registry schema: {'; '.join(described)}{more}. Fix the index.")


def describe_error(error: Any) -> str:
    """One schema violation as ``at models/x/...: what is wrong``, with a hint for the common ones."""
    path = "/".join(str(part) for part in error.absolute_path) or "(top level)"
    message = error.message
    if len(message) > _MAX_MESSAGE:
        message = message[:_MAX_MESSAGE] + "..."
    field = error.absolute_path[-1] if error.absolute_path else None
    if error.validator == "pattern" and field == "sha256":
        message += " (a sha256 must be 64 lowercase hexadecimal digits)"
    return f"at {path}: {message}"


def check_rules(index: dict[str, Any], *, source: str) -> None:
    """Cross-field rules; assumes the index already matches the schema."""
    models: dict[str, Any] = index["models"]
    default = index.get("default_model")
    if default is not None and default not in models:
        raise RegistryError(
            f"{source}: default_model {default!r} is not one of its models ({', '.join(sorted(models))}); "
            "fix default_model in the index"
        )
    for model_name, model in models.items():
        releases: dict[str, Any] = model["releases"]
        latest = model.get("latest")
        if latest is not None and latest not in releases:
            raise RegistryError(
                f"{source}: models/{model_name}/latest is {latest!r}, which is not one of its releases "
                f"({', '.join(sorted(releases))}); fix 'latest' or add the release"
            )
        for version, release in releases.items():
            check_release(release, where=f"{source}: models/{model_name}/releases/{version}")


def check_release(release: dict[str, Any], *, where: str) -> None:
    """Rules inside one release: lesion label present, channels in range, patch size fits the divisor."""
    channels: int = release["channels"]
    spec = release["input"]
    divisor: int = spec["divisor"]
    if any(size % divisor for size in spec["patch_size"]):
        raise RegistryError(
            f"{where}/input: patch_size {spec['patch_size']} is not divisible by divisor {divisor}; "
            f"use multiples of {divisor}"
        )
    check_asset_sizes(release, where)
    for site, head in release["heads"].items():
        names = [label["name"] for label in head["labels"]]
        if LESION_LABEL not in names:
            raise RegistryError(
                f"{where}/heads/{site} has no label named {LESION_LABEL!r} (labels: {', '.join(names)}); every head "
                f"must map a channel to '{LESION_LABEL}', which is written as the main mask"
            )
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise RegistryError(f"{where}/heads/{site} names label(s) {', '.join(duplicates)} more than once")
        for label in head["labels"]:
            if label["channel"] >= channels:
                raise RegistryError(
                    f"{where}/heads/{site}: label {label['name']!r} uses channel {label['channel']}, but the release "
                    f"has {channels} channel(s) (0 to {channels - 1}); fix the channel or 'channels'"
                )


def check_asset_sizes(release: dict[str, Any], where: str) -> None:
    """Every file of a release declares at most :data:`MAX_ASSET_BYTES`."""
    assets = {"backbone": release["backbone"]}
    assets.update({f"heads/{site}": head for site, head in release["heads"].items()})
    localiser = release.get("localiser")
    if localiser is not None:
        assets.update({"localiser/backbone": localiser["backbone"], "localiser/head": localiser["head"]})
    for name, asset in assets.items():
        if asset["size"] > MAX_ASSET_BYTES:
            raise RegistryError(
                f"{where}/{name} declares a size of {asset['size']} bytes, over the {MAX_ASSET_BYTES}-byte maximum "
                "of a model file (an ONNX graph cannot exceed 2 GiB); the index is broken or hostile, nothing was "
                "downloaded"
            )
