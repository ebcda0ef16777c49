"""Registry indexes on this machine: the one embedded in the package, a path or a ``file://`` URL, read with the
signature beside them.
"""

from __future__ import annotations

import urllib.parse
import urllib.request
from pathlib import Path

from sct_sitehead.errors import RegistryError
from sct_sitehead.registry.document import INDEX_NAME, MAX_INDEX_BYTES
from sct_sitehead.registry.signing import MAX_SIGNATURE_BYTES, signature_path


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


def read_local_index(path: Path) -> bytes:
    """The raw bytes of a local index.

    Raises:
        RegistryError: missing, unreadable, or over the size cap.
    """
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


def read_local_signature(index: Path) -> bytes | None:
    """The ``.sig`` beside a local index, None when there is none.

    Raises:
        RegistryError: it exists but cannot be read, or is over the size cap.
    """
    path = signature_path(index)
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
