"""Encrypted backup storages: a key file, and the codec that encrypts chunks with it.

A backup storage may name a key file (`keyfile`; `stork backup key create FILE` makes one,
mode 0600): 32 random bytes, from which HKDF-SHA256 derives three keys, one per use:
- chunk names are HMAC-SHA256 of the data under the name key, so a name reveals nothing of
  the content (a SHA-256 name would confirm a guess of it);
- chunk data is zstd-compressed where that helps, then sealed with AES-256-GCM under the
  data key and a random 96-bit nonce (a chunk file: b"STKC", kind 2, a flag byte saying
  whether it is compressed, the nonce, ciphertext and tag); reading one checks the tag, then
  the name of the data, so a tampered chunk, or one of another store, is a refusal;
- each manifest gets an HMAC under the manifest key (`manifest.mac`); a manifest lists every
  file of its snapshot with its SHA-256, so indexes and the guest config are authenticated
  through it. They are not encrypted: a guest's config and disk sizes stay readable.
The store records the key's fingerprint (`.chunks/.key-fingerprint`, ChunkStore.check_key),
so a wrong or missing key is one clear refusal before anything is read or written, never
garbage restored.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import stat
from pathlib import Path

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from drivers.backup.codec import CHUNK, KIND_AES_GCM, MAGIC, PlainCodec
from drivers.backup.files import write_all
from drivers.errors import AlreadyExists, ConfigError, Corrupt

KEY_BYTES = 32
NONCE_BYTES = 12
_HEADER = len(MAGIC) + 2 + NONCE_BYTES  # magic, kind, compressed flag, nonce


def create_key(path: Path) -> str:
    """Write a new key file (mode 0600, never over an existing file); its fingerprint."""
    key = os.urandom(KEY_BYTES)
    text = json.dumps({"version": 1, "key": base64.b64encode(key).decode()}) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise AlreadyExists(f"{path} exists: a key file is never overwritten (its backups would be lost)") from None
    except OSError as e:
        raise ConfigError(f"key file {path}: cannot create it: {e.strerror}") from None
    try:
        try:
            write_all(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:  # durable before anyone is told it exists: without it, every backup sealed with it is lost
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:  # a half-written key file would pass for one: it goes
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise ConfigError(f"key file {path}: cannot write it: {e.strerror}") from None
    return EncryptedCodec(key).fingerprint


def load_key(path: Path) -> bytes:
    """The key in a key file; ConfigError naming the file if it is unreadable, malformed, or
    readable by others than its owner."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"key file {path}: cannot open it: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # before fdopen(), which refuses a folder with a traceback's words
        os.close(fd)
        raise ConfigError(f"key file {path}: not a regular file")
    with os.fdopen(fd, "rb") as f:
        if st.st_mode & 0o077:
            raise ConfigError(f"key file {path}: readable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                              "chmod 600 it")
        raw = f.read(4096)
    try:
        doc = json.loads(raw)
        key = base64.b64decode(doc["key"], validate=True)
        if doc["version"] != 1 or len(key) != KEY_BYTES:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"key file {path}: not a stork key file (stork backup key create FILE)") from None
    return key


def _derive(master: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"stork " + purpose).derive(master)


class EncryptedCodec(PlainCodec):
    """Chunk names keyed (HMAC-SHA256), chunk data sealed (AES-256-GCM), manifests MACed."""

    def __init__(self, master: bytes, max_size: int = CHUNK) -> None:
        super().__init__(max_size)
        self._names = _derive(master, b"chunk names")
        self._aead = AESGCM(_derive(master, b"chunk data"))
        self._manifests = _derive(master, b"manifests")
        self.fingerprint = hmac.new(_derive(master, b"fingerprint"), b"stork", hashlib.sha256).hexdigest()[:32]

    def digest(self, data: bytes) -> str:
        return hmac.new(self._names, data, hashlib.sha256).hexdigest()

    def encode(self, data: bytes) -> bytes:
        packed = zstandard.ZstdCompressor(level=1).compress(data)
        compressed = len(packed) < len(data)
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, packed if compressed else data, None)
        return MAGIC + bytes([KIND_AES_GCM, int(compressed)]) + nonce + sealed

    def decode(self, blob: bytes, digest: str) -> bytes:
        if len(blob) < _HEADER + 16 or not blob.startswith(MAGIC):
            raise Corrupt(f"chunk {digest}: not a chunk file (no STKC header)")
        if blob[len(MAGIC)] != KIND_AES_GCM:
            raise Corrupt(f"chunk {digest}: not encrypted, in a store whose chunks all are")
        compressed, nonce = blob[len(MAGIC) + 1], blob[len(MAGIC) + 2:_HEADER]
        try:
            payload = self._aead.decrypt(nonce, blob[_HEADER:], None)
        except InvalidTag:
            raise Corrupt(f"chunk {digest}: fails authentication (tampered with, or sealed with another key)") from None
        data = self._decompress(payload, digest) if compressed else payload
        if len(data) > self.max_size or not hmac.compare_digest(self.digest(data), digest):
            raise Corrupt(f"chunk {digest}: its data does not match its name")
        return data

    def mac(self, record: bytes) -> bytes:
        return hmac.new(self._manifests, record, hashlib.sha256).hexdigest().encode()
