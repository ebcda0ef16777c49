"""The registry index as a document: its file name, its size cap, and its bytes decoded and validated.

Everything that reads an index (:mod:`index` loading it, :mod:`signing` checking one before it signs it) goes
through :func:`parse_index`, so no index is used, or signed, without passing the schema.
"""

from __future__ import annotations

from typing import Any

from sct_sitehead.registry import untrusted_json
from sct_sitehead.registry.schema import validate_index

#: The index's file name in a registry folder (a folder given as the location means this file in it).
INDEX_NAME = "registry.json"
#: Read or downloaded beyond this, an index is refused: a real one is a few kilobytes.
MAX_INDEX_BYTES = 16 * 1024 * 1024


def parse_index(data: bytes, source: str) -> dict[str, Any]:
    """Decode JSON and validate it (schema, then cross-field rules).

    Args:
        data: the index's raw bytes.
        source: its path or URL, for messages.

    Raises:
        RegistryError: not UTF-8 JSON, nested too deep, a repeated key or a non-finite number (see
            :mod:`untrusted_json`), or invalid (see :func:`schema.validate_index`).
    """
    # Any other JSON value than an object fails validate_index.
    index: dict[str, Any] = untrusted_json.loads(data, f"registry index {source}")
    validate_index(index, source=f"registry index {source}")
    return index
