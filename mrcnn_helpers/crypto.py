"""Optional encryption of checkpoints and exported files with a passphrase (TLT's `-k KEY`).

Authenticated encryption from the `cryptography` package: AES-256-GCM with a key derived from the
passphrase by scrypt (a fresh random salt and nonce per file). A wrong passphrase or a modified
file fails authentication, so nothing is ever silently decrypted into garbage.

File layout: MAGIC (8 bytes) | salt (16) | nonce (12) | ciphertext + 16-byte tag. The header is
authenticated too (associated data).
"""

from __future__ import annotations

import os
from pathlib import Path

from mrcnn_helpers.errors import MrcnnError
from mrcnn_helpers.fileio import atomic_write, check_output_path

MAGIC = b"MRCNENC1"
SALT_BYTES, NONCE_BYTES, TAG_BYTES = 16, 12, 16
ENCRYPTION_OVERHEAD = len(MAGIC) + SALT_BYTES + NONCE_BYTES + TAG_BYTES  # bytes added per file
# AES-GCM in `cryptography` takes at most 2**31 - 1 bytes per call: larger files are refused
# before they are read, naming their size.
MAX_PLAINTEXT_BYTES = 2 ** 31 - 1 - TAG_BYTES
# scrypt cost: 2**15 x 8 x 1 takes ~32 MiB and ~0.1 s, so guessing passphrases is slow.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 15, 8, 1


class EncryptionError(MrcnnError):
    """A file cannot be encrypted or decrypted: wrong key, corrupt file, no key, no library."""


def _aead(passphrase: str, salt: bytes):
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
    except ImportError:
        raise EncryptionError("encryption (--key) needs the 'cryptography' package: "
                              "pip install cryptography") from None
    if not passphrase:
        raise EncryptionError("the encryption key is empty; pass a non-empty --key")
    kdf = Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    return AESGCM(kdf.derive(passphrase.encode("utf-8")))


def is_encrypted(data_or_path) -> bool:
    """True when bytes (or the file at a path) start with this module's header."""
    if isinstance(data_or_path, (bytes, bytearray, memoryview)):
        return bytes(data_or_path[:len(MAGIC)]) == MAGIC
    with open(data_or_path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def encrypt_bytes(data: bytes, passphrase: str) -> bytes:
    """MAGIC | salt | nonce | AES-256-GCM(data); EncryptionError for more than
    MAX_PLAINTEXT_BYTES."""
    if len(data) > MAX_PLAINTEXT_BYTES:
        raise EncryptionError(f"cannot encrypt {len(data)} bytes: at most {MAX_PLAINTEXT_BYTES} "
                              "can be encrypted in one file")
    salt, nonce = os.urandom(SALT_BYTES), os.urandom(NONCE_BYTES)
    header = MAGIC + salt + nonce
    return header + _aead(passphrase, salt).encrypt(nonce, bytes(data), header)


def decrypt_bytes(blob: bytes, passphrase: str | None, source: str = "<bytes>") -> bytes:
    """Plaintext of `blob`; EncryptionError naming `source` on a wrong key or a damaged file."""
    if not is_encrypted(blob):
        raise EncryptionError(f"{source} is not an encrypted file of this toolkit")
    if not passphrase:
        raise EncryptionError(f"{source} is encrypted: pass its key (--key)")
    start = len(MAGIC)
    salt = blob[start:start + SALT_BYTES]
    nonce = blob[start + SALT_BYTES:start + SALT_BYTES + NONCE_BYTES]
    header = blob[:start + SALT_BYTES + NONCE_BYTES]
    from cryptography.exceptions import InvalidTag

    try:
        return _aead(passphrase, salt).decrypt(nonce, blob[len(header):], header)
    except InvalidTag:
        raise EncryptionError(f"cannot decrypt {source}: wrong key, or the file was modified or "
                              "truncated") from None


def write_encrypted(path, data: bytes, passphrase: str) -> Path:
    """Encrypt `data` into `path` atomically (fileio.atomic_write)."""
    return atomic_write(path, encrypt_bytes(data, passphrase), what="encrypted file")


def _read(path) -> bytes:
    """The bytes of the file at `path`; EncryptionError naming it when it cannot be read or is
    an encrypted file too large to be one of this module's."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(MAGIC))
            size = os.fstat(handle.fileno()).st_size
            if head == MAGIC and size > MAX_PLAINTEXT_BYTES + ENCRYPTION_OVERHEAD:
                raise EncryptionError(f"{path} is {size} bytes, more than an encrypted file of "
                                      "this toolkit can hold: damaged or not ours")
            return head + handle.read()
    except OSError as exc:
        raise EncryptionError(f"cannot read {path}: {exc.strerror or exc}") from None


def read_maybe_encrypted(path, passphrase: str | None = None) -> bytes:
    """Bytes of the file at `path`, decrypted when it is encrypted (then the key is required).
    The plaintext stays in memory: nothing decrypted is written anywhere."""
    data = _read(path)
    return decrypt_bytes(data, passphrase, str(path)) if is_encrypted(data) else data


def encrypt_file(src, dst, passphrase: str) -> Path:
    """Write an encrypted copy of `src` to `dst` (e.g. a checkpoint before sharing it); `dst`
    may not be `src`."""
    check_output_path(dst, [src], option="encrypted copy")
    return write_encrypted(dst, _read(src), passphrase)
