"""Optional signatures for the files that travel (checkpoints, detector files): HMAC-SHA256 with a key the user
holds, so that a file edited by someone without the key -- and its SHA-256 recomputed -- is refused.

The key comes from the environment: ``LGM_SIGNING_KEY`` (the key itself, at least 16 bytes; e.g. the output of
``openssl rand -hex 32``) or ``LGM_SIGNING_KEY_FILE`` (a file holding it; surrounding whitespace is ignored).
Without either, nothing is signed or checked.  With one set:

- every file written (``lgm train``'s checkpoints, ``lgm detect fit``'s detector files) carries ``signature``:
  the HMAC-SHA256 of its content digest (the SHA-256 it carries anyway) under a purpose of its own (a
  checkpoint's signature cannot pass for a detector file's);
- every load checks it: a file without a signature, or with one made by another key (or over other content), is
  refused, naming the file.

What a signature protects against, and what it does not: docs/lab.md ("No run is ever lost").

In Python (``digest``: any ``str`` or ``bytes``, normally a file's SHA-256)::

    key = signing_key()                              # None: signing is off
    sig = sign(digest, purpose="lgm-ext checkpoint")
    verify(digest, sig, purpose="lgm-ext checkpoint", path=path, error=CheckpointError)

and for a dict of content (as checkpoints and detector files are): :func:`lgm_lab.checkpoints.add_signature`,
:func:`lgm_lab.checkpoints.check_signature`.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

__all__ = ["KEY_VARIABLE", "KEY_FILE_VARIABLE", "MIN_KEY_BYTES", "SIGNATURE_KEY", "SigningKeyError", "signing_key",
           "sign", "verify"]

KEY_VARIABLE = "LGM_SIGNING_KEY"
KEY_FILE_VARIABLE = "LGM_SIGNING_KEY_FILE"
MIN_KEY_BYTES = 16
SIGNATURE_KEY = "signature"  # the key of the signature in a checkpoint or detector file


class SigningKeyError(ValueError):
    """The signing key the environment names cannot be used (unreadable, too short, both variables set)."""


def signing_key() -> bytes | None:
    """The signing key from ``LGM_SIGNING_KEY`` or the file ``LGM_SIGNING_KEY_FILE`` names; None when neither is
    set (or both are empty).  Raises :class:`SigningKeyError` for a key file that cannot be read, a key shorter than
    :data:`MIN_KEY_BYTES`, or both variables set (which one is meant?)."""
    value = os.environ.get(KEY_VARIABLE, "")
    file = os.environ.get(KEY_FILE_VARIABLE, "")
    if value and file:
        raise SigningKeyError(f"both {KEY_VARIABLE} and {KEY_FILE_VARIABLE} are set: set one of them")
    if file:
        try:
            key = Path(file).expanduser().read_bytes().strip()
        except OSError as err:
            raise SigningKeyError(f"{KEY_FILE_VARIABLE}={file}: cannot read the signing key "
                                  f"({err.strerror or err})") from err
        where = f"the key in {KEY_FILE_VARIABLE}={file}"
    elif value:
        key, where = value.encode(), KEY_VARIABLE
    else:
        return None
    if len(key) < MIN_KEY_BYTES:
        raise SigningKeyError(f"{where} is {len(key)} bytes; a signing key has at least {MIN_KEY_BYTES} (e.g. "
                              "`openssl rand -hex 32`)")
    return key


def _message(data, purpose: str) -> bytes:
    body = data.encode() if isinstance(data, str) else bytes(data)
    return purpose.encode() + b"\0" + body


def sign(data, *, purpose: str, key: bytes | None = None) -> str | None:
    """The HMAC-SHA256 (hex) of ``data`` (``str`` or ``bytes``: a content digest) for ``purpose`` under ``key``
    (default: :func:`signing_key`); None when there is no key."""
    key = signing_key() if key is None else key
    if key is None:
        return None
    return hmac.new(key, _message(data, purpose), hashlib.sha256).hexdigest()


def verify(data, signature, *, purpose: str, path, error: type[Exception] = ValueError,
           key: bytes | None = None) -> bool:
    """Check ``signature`` over ``data`` for ``purpose`` when a key is set (default: :func:`signing_key`): True
    when it matches, False when no key is set (nothing to check).  Raises ``error`` naming ``path`` when a key is
    set and the file carries no signature, or one that does not match (another key, or other content); a key that
    cannot be used is raised as ``error`` too."""
    try:
        key = signing_key() if key is None else key
    except SigningKeyError as err:
        raise error(f"cannot check {path}: {err}") from err
    if key is None:
        return False
    if not isinstance(signature, str) or not signature:
        raise error(f"refusing to load {path}: it is not signed, and a signing key is set ({KEY_VARIABLE} or "
                    f"{KEY_FILE_VARIABLE}): only files signed with your key are loaded (sign it by writing it again "
                    "with the key set, or unset the key)")
    if not hmac.compare_digest(signature, sign(data, purpose=purpose, key=key)):
        raise error(f"refusing to load {path}: its signature does not match your signing key (signed with another "
                    "key, or edited after it was signed)")
    return True
