"""The registry index as a document: its file name, its size cap, and its bytes decoded and validated.

Everything that reads an index (:mod:`index` loading it, :mod:`signing` checking one before it signs it) goes
through :func:`parse_index`, so no index is used, or signed, without passing the schema.
"""

from __future__ import annotations

import json
from typing import Any

from sct_sitehead.errors import RegistryError
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
