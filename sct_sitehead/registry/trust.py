"""Whether a registry index may be used: its signature against the trusted keys, and its serial against the
highest one seen before from the same location (rollback protection).

Trusted keys come from three places, all ``*.pub`` PEM files (see :mod:`signing`): the project's, shipped in
the package (``sct_sitehead/keys/``); a site's, in the trusted keys folder (``SCT_SITEHEAD_TRUST_DIR``, else
``<user config folder>/sct_sitehead/trusted_keys``); and those given per call (``-trust KEYFILE``).

Rollback state lives in the cache (``state/seen.json``): for each registry location (its canonical form, see
:func:`canonical_location`, so that ``localhost``, a trailing ``?``, ``//`` or ``/./`` name the same registry), one
record per key id
(``"unsigned"`` for an unsigned index allowed by the user) of the highest ``serial`` seen, its ``updated`` and
the sha256 of its bytes. A signed index is compared with the signed records only, so an unsigned index, which
anyone on the path could have written, cannot raise the bar and lock out the real registry; an unsigned index is
compared with every record. Lower serial: refused. Same serial, other bytes: refused (a publisher raises the
serial at every change, so this is a stale or forged copy).
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sct_sitehead import env
from sct_sitehead.atomic import write_bytes_atomic
from sct_sitehead.errors import RegistryError, UsageError
from sct_sitehead.registry import untrusted_json
from sct_sitehead.registry.cache import Cache
from sct_sitehead.registry.download import is_loopback
from sct_sitehead.registry.signing import (
    key_id,
    parse_signature,
    public_key_from_pem,
    read_key_file,
    verify_index_bytes,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

logger = logging.getLogger(__name__)

PACKAGE_KEYS = "keys"
KEY_SUFFIX = ".pub"
UNSIGNED = "unsigned"
STATE_FORMAT = 1
LOCK_TIMEOUT = 30.0


# --- trusted keys -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrustStore:
    """Trusted public keys by key id, and the file each came from (for messages)."""

    keys: dict[str, Ed25519PublicKey]
    sources: dict[str, str]

    def describe(self) -> str:
        """``"3f9a0c1d2e4b5a67 (…/keys/project.pub), …"``, or ``"none"``."""
        return ", ".join(f"{identifier} ({self.sources[identifier]})" for identifier in sorted(self.keys)) or "none"


def load_trust_store(extra: Sequence[Path] = ()) -> TrustStore:
    """The package's keys, the trusted keys folder's, and ``extra``.

    A bad file in the folder is skipped with a warning (it can only make fewer indexes verify); a bad key in
    the package or in ``extra`` is an error, since someone asked for it by name.

    Raises:
        UsageError: a file of ``extra`` is missing or not an ed25519 public key.
        RegistryError: a key shipped in the package is broken (reinstall).
    """
    keys: dict[str, Ed25519PublicKey] = {}
    sources: dict[str, str] = {}

    def add(key: Ed25519PublicKey, source: str) -> None:
        identifier = key_id(key)
        keys.setdefault(identifier, key)
        sources.setdefault(identifier, source)

    for name, data in package_keys():
        try:
            add(public_key_from_pem(data, name), name)
        except UsageError as exc:
            raise RegistryError(f"a key shipped with sct_sitehead is broken: {exc}. Reinstall sct_sitehead.") from None
    folder = env.trust_dir()
    for path in sorted(folder.glob(f"*{KEY_SUFFIX}")) if folder.is_dir() else ():
        try:
            add(public_key_from_pem(read_key_file(path, "public key"), str(path)), str(path))
        except UsageError as exc:
            logger.warning("skipping trusted key file %s: %s", path, exc)
    for path in extra:
        add(public_key_from_pem(read_key_file(Path(path), "public key"), str(path)), str(path))
    return TrustStore(keys, sources)


def package_keys() -> list[tuple[str, bytes]]:
    """``(name, PEM bytes)`` of every ``*.pub`` shipped in ``sct_sitehead/keys/``."""
    from importlib import resources

    folder = resources.files("sct_sitehead.registry").joinpath(PACKAGE_KEYS)
    if not folder.is_dir():
        return []
    entries = sorted((entry for entry in folder.iterdir() if entry.name.endswith(KEY_SUFFIX)), key=lambda e: e.name)
    return [(f"sct_sitehead/registry/{PACKAGE_KEYS}/{entry.name}", entry.read_bytes()) for entry in entries]


# --- signatures ---------------------------------------------------------------------------------------------------
def check_signature(
    data: bytes,
    signature: bytes | None,
    *,
    source: str,
    signature_source: str | None = None,
    unsigned_ok: bool,
    trust: Sequence[Path] = (),
) -> str | None:
    """Verify an index's raw bytes against its raw ``.sig`` before anything in the index is parsed.

    Args:
        data: the index's bytes.
        signature: the ``.sig`` file's bytes, None when there is none.
        source: the index's path or URL, for messages.
        signature_source: where the signature was looked for (default ``source + ".sig"``).
        unsigned_ok: accept a missing signature (embedded and local indexes, or ``allow_unsigned``). A
            signature that is present is always checked.
        trust: extra public key files (``-trust``).

    Returns:
        the signing key's id, or None for an accepted unsigned index.

    Raises:
        RegistryError: unsigned where a signature is required, a malformed signature, a key not trusted, or a
            signature that does not match.
        UsageError: a file of ``trust`` is not a usable public key.
    """
    signature_source = signature_source or f"{source}.sig"
    if signature is None:
        if unsigned_ok:
            logger.debug("registry index %s is not signed (accepted: local or allowed)", source)
            return None
        raise RegistryError(
            f"registry index {source} is not signed (no {signature_source}), and a remote index must be: it "
            "names the sha256 of every model file. Its publisher signs it with `sct_sitehead registry sign "
            "registry.json -key PRIVATE_KEY` and publishes registry.json.sig beside it. To use an unsigned index "
            "from a server you trust, add -allow-unsigned."
        )
    parsed = parse_signature(signature, source=signature_source)
    store = load_trust_store(trust)
    if parsed["key_id"] not in store.keys:
        raise RegistryError(
            f"registry index {source} is signed with key {parsed['key_id']}, which is not trusted here (trusted: "
            f"{store.describe()}). Nothing in it was used. If you trust its publisher, get their public key file "
            f"over a channel you trust and pass it with -trust KEYFILE, or copy it into {env.trust_dir()} "
            "(SCT_SITEHEAD_TRUST_DIR)."
        )
    identifier = verify_index_bytes(data, parsed, store.keys, source=source)
    logger.info("registry index %s is signed by trusted key %s (%s)", source, identifier, store.sources[identifier])
    return identifier


# --- rollback protection ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Seen:
    """What was seen of one index: its serial, its ``updated`` stamp and the sha256 of its bytes."""

    serial: int
    updated: str | None
    sha256: str


def rollback_conflict(records: Mapping[str, Seen], key: str, now: Seen) -> Seen | None:
    """The earlier record that refuses ``now`` (signed by ``key``, or ``UNSIGNED``), or None to accept it.

    Signed indexes are compared with signed records only; unsigned ones with all records (module notes).
    """
    relevant = [seen for name, seen in records.items() if key == UNSIGNED or name != UNSIGNED]
    for seen in sorted(relevant, key=lambda record: record.serial, reverse=True):
        if now.serial < seen.serial or (now.serial == seen.serial and now.sha256 != seen.sha256):
            return seen
    return None


def remember_index(cache: Cache, location: str, key_id: str | None, index: Mapping[str, Any], data: bytes) -> None:
    """Refuse ``index`` if it rolls back what was seen from ``location``; otherwise record it.

    A cache that cannot be written still refuses what it has recorded; it only cannot record more (warning).

    Raises:
        RegistryError: lower serial, or the same serial with other bytes (see :func:`rollback_conflict`).
    """
    from filelock import FileLock, Timeout

    key = key_id or UNSIGNED
    entry = canonical_location(location)
    serial = index.get("serial", 0)
    updated = index.get("updated")
    now = Seen(
        serial if isinstance(serial, int) else 0,
        updated if isinstance(updated, str) else None,
        hashlib.sha256(data).hexdigest(),
    )
    path = cache.seen_path()
    recorded = read_state(path).get(entry, {})
    refuse_rollback(location, key, now, recorded, path, entry)
    if recorded.get(key) == now:
        return  # the usual case (same index again, or offline): no lock, no write, so a read-only cache works
    lock = FileLock(str(cache.root / "locks" / "seen.lock"))
    try:
        Path(lock.lock_file).parent.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=LOCK_TIMEOUT)
    except (OSError, Timeout) as exc:
        logger.warning(
            "cannot record serial %d of %s in %s (%s); rollback protection will not remember it",
            now.serial,
            location,
            path,
            exc,
        )
        return
    try:
        state = read_state(path)  # again: another process may have recorded a newer index meanwhile
        records = state.setdefault(entry, {})
        refuse_rollback(location, key, now, records, path, entry)
        records[key] = now
        try:
            write_bytes_atomic(path, encode_state(state))
        except OSError as exc:
            logger.warning(
                "cannot record serial %d of %s in %s (%s); rollback protection will not remember it",
                now.serial,
                location,
                path,
                exc.strerror or exc,
            )
    finally:
        lock.release()


def refuse_rollback(
    location: str, key: str, now: Seen, records: Mapping[str, Seen], path: Path, entry: str | None = None
) -> None:
    """Raise the RegistryError that explains why ``now`` is refused, if it is (``entry``: the state's key)."""
    seen = rollback_conflict(records, key, now)
    if seen is None:
        return
    signer = "unsigned" if key == UNSIGNED else f"signed by key {key}"
    fix = f"if the older index is intended, delete the entry for {entry or location} from {path}."
    if now.serial < seen.serial:
        raise RegistryError(
            f"registry index {location} ({signer}) has serial {now.serial}{stamp(now)}, lower than serial "
            f"{seen.serial}{stamp(seen)} seen before from it; it may be a stale mirror or a rollback to an index "
            f"with known problems. Nothing in it was used. Use another -registry, or {fix}"
        )
    raise RegistryError(
        f"registry index {location} ({signer}) has serial {now.serial}, like the one seen before from it, but other "
        f"content (sha256 {now.sha256[:16]}..., before {seen.sha256[:16]}...); a publisher raises the serial at "
        f"every change, so this is a stale or forged copy. Nothing in it was used. Publishers: raise the serial "
        f"and sign again. Users: use another -registry, or {fix}"
    )


def stamp(seen: Seen) -> str:
    return f" (updated {seen.updated})" if seen.updated else ""


def canonical_location(location: str) -> str:
    """The form of a registry URL under which its rollback state is kept: one registry, however it is spelled.

    For ``http(s)://``: scheme and host in lower case, every loopback host (``localhost``, 127.0.0.0/8, ``::1``)
    as ``loopback``, the default port dropped, the path with ``//``, ``/./`` and ``..`` resolved and needless
    percent-escapes undone, an empty query (a trailing ``?``) and the fragment dropped. Other locations (``file://``
    URIs of resolved paths) are returned as they are.
    """
    parts = urllib.parse.urlsplit(location)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        return location
    try:
        port = parts.port
    except ValueError:
        return location  # not a URL the download would accept either
    host = (parts.hostname or "").rstrip(".")
    host = "loopback" if is_loopback(host) else host
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != {"http": 80, "https": 443}[scheme]:
        host = f"{host}:{port}"
    path = urllib.parse.quote(urllib.parse.unquote(parts.path), safe="/:@!$&'()*+,;=-._~")
    path = posixpath.normpath(re.sub("/+", "/", path or "/"))
    if parts.path.endswith("/") and path != "/":
        path += "/"
    return urllib.parse.urlunsplit((scheme, host, path, parts.query, ""))


def read_state(path: Path) -> dict[str, dict[str, Seen]]:
    """``{location: {key: Seen}}`` from ``seen.json``, locations in their canonical form (records kept under
    other spellings by an earlier version are merged, the highest serial winning); empty when missing, unreadable
    entries skipped."""
    try:
        raw = untrusted_json.loads(path.read_bytes(), f"rollback state {path}")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        # Whoever can corrupt this file can also write the cache's assets, so starting afresh loses nothing.
        logger.warning("ignoring unreadable rollback state %s: %s", path, exc)
        return {}
    locations = raw.get("locations") if isinstance(raw, dict) else None
    state: dict[str, dict[str, Seen]] = {}
    for location, records in (locations or {}).items():
        if not isinstance(records, dict):
            continue
        for key, record in records.items():
            try:
                seen = Seen(int(record["serial"]), record.get("updated"), str(record["sha256"]))
            except (AttributeError, KeyError, TypeError, ValueError):
                continue
            records_now = state.setdefault(canonical_location(str(location)), {})
            if key not in records_now or records_now[key].serial < seen.serial:
                records_now[key] = seen
    return state


def encode_state(state: Mapping[str, Mapping[str, Seen]]) -> bytes:
    document = {
        "format": STATE_FORMAT,
        "locations": {
            location: {
                key: {"serial": s.serial, "updated": s.updated, "sha256": s.sha256} for key, s in records.items()
            }
            for location, records in sorted(state.items())
        },
    }
    return (json.dumps(document, indent=1, sort_keys=True) + "\n").encode("utf-8")
