"""Ed25519 key pairs and detached signatures of registry indexes.

A signature is a small JSON file beside the index, ``registry.json.sig``::

    {"algorithm": "ed25519", "key_id": "3f9a0c1d2e4b5a67", "signature": "<base64 of 64 bytes>"}

signed over the exact bytes of ``registry.json`` (no canonical JSON: what is verified is what is parsed).
``key_id`` is the first 16 hex digits of the sha256 of the raw 32-byte public key; it only picks the key
to try, the signature check itself decides. Keys are PEM files: the private key PKCS#8, unencrypted (keep it
off shared machines), the public key SubjectPublicKeyInfo. ``cryptography`` is imported only here, and only
when a key or signature is actually handled.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sct_sitehead.atomic import write_bytes_atomic
from sct_sitehead.errors import OutputError, RegistryError, UsageError
from sct_sitehead.registry import untrusted_json
from sct_sitehead.registry.document import MAX_INDEX_BYTES, parse_index

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

logger = logging.getLogger(__name__)

ALGORITHM = "ed25519"
SIGNATURE_SUFFIX = ".sig"
MAX_SIGNATURE_BYTES = 4096
MAX_KEY_BYTES = 16 * 1024
_KEY_ID = re.compile(r"[0-9a-f]{16}")


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the sha256 of the raw 32-byte public key."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def signature_path(index_path: Path) -> Path:
    """``registry.json`` -> ``registry.json.sig``."""
    return index_path.with_name(index_path.name + SIGNATURE_SUFFIX)


# --- keys ---------------------------------------------------------------------------------------------------------
def generate_keypair(private_path: Path, public_path: Path, *, force: bool = False) -> str:
    """Create an ed25519 key pair: the private key PEM with mode 0600, the public key PEM beside it (0644).

    Both files are written atomically; without ``force`` an existing file is never replaced (a lost private
    key cannot be recovered, and signatures made with it would no longer match the new public key).

    Returns:
        the new key's id (16 hex digits).

    Raises:
        UsageError: a key file exists and ``force`` is false.
        OutputError: a file cannot be written.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path, public_path = Path(private_path), Path(public_path)
    if private_path.resolve() == public_path.resolve():
        raise UsageError(f"the private and public key paths are the same file ({private_path}); give two paths")
    if not force:
        for path in (private_path, public_path):
            if path.exists():
                raise UsageError(
                    f"key file {path} already exists; it was left untouched. Choose another path, or pass -force to "
                    "replace it (indexes signed with the old key then need the old public key to verify)."
                )
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # The private key goes first: a crash in between leaves a private key without its public half (derivable
    # again), never a published public key whose private half is lost.
    for path, data, mode in ((private_path, private_pem, 0o600), (public_path, public_pem, 0o644)):
        try:
            write_bytes_atomic(path, data, mode=mode, replace=force)
        except FileExistsError:
            raise UsageError(
                f"key file {path} appeared while the key pair was being written; it was left untouched"
            ) from None
        except OSError as exc:
            raise OutputError(f"cannot write key file {path}: {exc.strerror or exc}; check the folder") from None
    identifier = key_id(private_key.public_key())
    logger.info("created ed25519 key %s: private %s, public %s", identifier, private_path, public_path)
    return identifier


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an unencrypted ed25519 private key (PEM, PKCS#8).

    Raises:
        UsageError: missing, unreadable, encrypted, or not an ed25519 private key.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = read_key_file(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise UsageError(f"private key {path} is encrypted; sign with an unencrypted key (PEM, PKCS#8)") from None
    except ValueError as exc:
        raise UsageError(f"{path} is not a PEM private key ({exc}); give the file written by keygen") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"private key {path} is a {type(key).__name__}, not an ed25519 key; create one with keygen")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read an ed25519 public key (PEM).

    Raises:
        UsageError: missing, unreadable, or not an ed25519 public key.
    """
    return public_key_from_pem(read_key_file(path, "public key"), str(path))


def public_key_from_pem(data: bytes, source: str) -> Ed25519PublicKey:
    """Parse PEM bytes as an ed25519 public key; ``source`` names the file in messages.

    Raises:
        UsageError: not a PEM ed25519 public key (a private key is refused too: it must not be spread).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if b"PRIVATE KEY" in data:
        raise UsageError(
            f"{source} holds a PRIVATE key; trust only the public key file (.pub), and keep the private one secret"
        )
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise UsageError(f"{source} is not a PEM public key ({exc}); give the .pub file written by keygen") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UsageError(f"public key {source} is a {type(key).__name__}, not an ed25519 key")
    return key


def read_key_file(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{what} file {path} does not exist; check the path") from None
    except OSError as exc:
        raise UsageError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_BYTES:
        raise UsageError(f"{what} file {path} is {len(data)} bytes; a PEM ed25519 key is a few hundred")
    return data


# --- signatures ---------------------------------------------------------------------------------------------------
def sign_bytes(data: bytes, private_key: Ed25519PrivateKey) -> bytes:
    """The content of a ``.sig`` file for ``data`` (JSON, UTF-8, newline-terminated)."""
    signature = {
        "algorithm": ALGORITHM,
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(private_key.sign(data)).decode("ascii"),
    }
    return (json.dumps(signature, indent=2) + "\n").encode("utf-8")


def sign_index(index_path: Path, private_key_path: Path) -> Path:
    """Sign a registry index: write ``<index>.sig`` beside it, atomically.

    The index is validated first, so a broken index is never published with a valid signature; after signing,
    any change to it (even whitespace) needs a new signature.

    Returns:
        the signature file's path.

    Raises:
        UsageError: the index or the key cannot be read, or the key is not an ed25519 private key.
        RegistryError: the index is not a valid registry index.
        OutputError: the signature cannot be written.
    """
    index_path = Path(index_path)
    private_key = load_private_key(private_key_path)
    try:
        data = index_path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read registry index {index_path}: {exc.strerror or exc}") from None
    if len(data) > MAX_INDEX_BYTES:
        raise RegistryError(f"registry index {index_path} is {len(data)} bytes, over the {MAX_INDEX_BYTES}-byte limit")
    index = parse_index(data, str(index_path))
    if not index.get("serial"):
        logger.warning(
            '%s has no serial (or 0): clients cannot tell a newer index from an older one; add "serial": 1 and '
            "raise it at every publication",
            index_path,
        )
    target = signature_path(index_path)
    try:
        write_bytes_atomic(target, sign_bytes(data, private_key))
    except OSError as exc:
        raise OutputError(f"cannot write signature {target}: {exc.strerror or exc}") from None
    logger.info("signed %s with key %s: %s", index_path, key_id(private_key.public_key()), target)
    return target


def parse_signature(raw: bytes, *, source: str) -> dict[str, Any]:
    """Decode a ``.sig`` file and check its fields' shapes (not the signature itself).

    Raises:
        RegistryError: too large, not JSON (or refused by :mod:`untrusted_json`), an unknown algorithm, or a
            malformed key id or signature.
    """
    where = f"signature file {source}"
    if len(raw) > MAX_SIGNATURE_BYTES:
        raise RegistryError(f"{where} is {len(raw)} bytes, over the {MAX_SIGNATURE_BYTES}-byte limit")
    not_object = "is not a JSON object; re-create it with `sct_sitehead registry sign`"
    signature = untrusted_json.loads(raw, where, malformed=not_object)
    if not isinstance(signature, dict):
        raise RegistryError(f"{where} {not_object}")
    check_signature_fields(signature, where)
    return signature


def check_signature_fields(signature: Mapping[str, Any], where: str) -> bytes:
    """The raw 64 signature bytes, after checking ``algorithm``, ``key_id`` and ``signature``."""
    algorithm = signature.get("algorithm", ALGORITHM)
    if algorithm != ALGORITHM:
        raise RegistryError(f"{where} uses algorithm {algorithm!r}; this sct_sitehead verifies {ALGORITHM!r} only")
    identifier = signature.get("key_id")
    if not isinstance(identifier, str) or not _KEY_ID.fullmatch(identifier):
        raise RegistryError(f"{where} has key_id {identifier!r}; expected 16 lowercase hexadecimal digits")
    encoded = signature.get("signature")
    try:
        raw = base64.b64decode(encoded, validate=True) if isinstance(encoded, str) else b""
    except binascii.Error:
        raw = b""
    if len(raw) != 64:
        raise RegistryError(f"{where} has no valid signature (expected the base64 of 64 bytes)")
    return raw


def verify_index_bytes(
    data: bytes,
    signature: Mapping[str, Any],
    trusted: Mapping[str, Ed25519PublicKey],
    *,
    source: str = "registry index",
) -> str:
    """Check that ``signature`` (a parsed ``.sig``) is a trusted key's signature of exactly ``data``.

    Args:
        data: the index's raw bytes, before any parsing.
        signature: ``{"key_id": ..., "signature": ...}``.
        trusted: trusted public keys by key id.
        source: the index's path or URL, for messages.

    Returns:
        the id of the key that signed it.

    Raises:
        RegistryError: malformed signature, unknown key, or a signature that does not match the bytes.
    """
    from cryptography.exceptions import InvalidSignature

    raw = check_signature_fields(signature, f"signature of {source}")
    identifier = str(signature["key_id"])
    public_key = trusted.get(identifier)
    if public_key is None:
        known = ", ".join(sorted(trusted)) or "none"
        raise RegistryError(
            f"registry index {source} is signed with key {identifier}, which is not trusted here (trusted keys: "
            f"{known}). Nothing in it was used. If you trust its publisher, get their public key file over a "
            "channel you trust and pass it with -trust KEYFILE, or copy it into the trusted keys folder "
            "(SCT_SITEHEAD_TRUST_DIR)."
        )
    try:
        public_key.verify(raw, data)
    except InvalidSignature:
        raise RegistryError(
            f"the signature of registry index {source} (key {identifier}) does not match its content: the index or "
            "its .sig was altered after signing, on the server or in transit. Nothing in it was used. If you "
            "publish it, sign it again (`sct_sitehead registry sign`); otherwise use another -registry, or try "
            "again if it was being updated just now."
        ) from None
    return identifier
