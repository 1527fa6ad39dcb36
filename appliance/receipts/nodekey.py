"""The node's receipt-signing key: ``SYNAPSE_ROOT/keys/node_ed25519`` (README, "Where data lives").

The file holds the 32-byte Ed25519 seed as 64 hex characters (a raw 32-byte
file is accepted too). Whoever can read it can forge this node's receipts, and
whoever can replace it can make the node sign with their key, so (threat
T-RCPT-1) the file must be ours, a regular file, not a symlink, and mode 0600
or stricter; the directory must be ours and is kept at 0700. A key that fails
these checks is refused with a message that says how to fix it — never
silently re-created, because a new key would orphan every earlier signature.
"""
from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

import nacl.bindings
import nacl.signing

KEY_FILE = "node_ed25519"


class NodeKeyError(RuntimeError):
    """The node key file is unusable; start-up must stop."""


class NodeKey:
    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._signing_key = signing_key
        # The 64-byte libsodium secret key of the same seed, for sign() (run path:
        # the signature without PyNaCl's SignedMessage object around it).
        self._secret = nacl.bindings.crypto_sign_seed_keypair(bytes(signing_key))[1]
        self.verify_key: nacl.signing.VerifyKey = signing_key.verify_key
        public = bytes(self.verify_key)
        self.public_key_hex: str = public.hex()
        self.key_id: str = hashlib.sha256(public).hexdigest()[:16]

    def __repr__(self) -> str:  # never show the seed
        return f"NodeKey(key_id={self.key_id!r})"

    @classmethod
    def generate(cls) -> NodeKey:
        """A fresh in-memory key (tests)."""
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> NodeKey:
        if len(seed) != 32:
            raise NodeKeyError("an Ed25519 seed is 32 bytes")
        return cls(nacl.signing.SigningKey(seed))

    def sign(self, data: bytes) -> bytes:
        """Detached 64-byte Ed25519 signature (what ``SigningKey.sign(data).signature`` is:
        the first 64 bytes of libsodium's signed message)."""
        return nacl.bindings.crypto_sign(data, self._secret)[:nacl.bindings.crypto_sign_BYTES]

    @classmethod
    def load(cls, keys_dir: Path) -> NodeKey:
        """Load an existing key; never create one (verification, export)."""
        return cls.from_seed(_read_seed(Path(keys_dir) / KEY_FILE))

    @classmethod
    def load_or_create(cls, keys_dir: Path) -> NodeKey:
        keys_dir = Path(keys_dir)
        _ensure_private_dir(keys_dir)
        path = keys_dir / KEY_FILE
        if not os.path.lexists(path):
            _create_key_file(path)
        return cls.from_seed(_read_seed(path))


def _ensure_private_dir(keys_dir: Path) -> None:
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.stat(keys_dir, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        raise NodeKeyError(f"{keys_dir} is not a directory")
    if st.st_uid != os.geteuid():
        # T-RCPT-1: another user could swap our key file for theirs.
        raise NodeKeyError(f"{keys_dir} is not owned by this user (uid {os.geteuid()}); fix its ownership")
    if stat.S_IMODE(st.st_mode) & 0o077:
        # Ours, so tightening is safe and keeps others from listing or replacing the key.
        os.chmod(keys_dir, 0o700)


def _create_key_file(path: Path) -> None:
    """Write a new seed atomically: other processes see no file or a whole one."""
    seed = nacl.signing.SigningKey.generate().encode()
    fd, tmp = tempfile.mkstemp(prefix=".node_ed25519.", dir=path.parent)  # mkstemp is 0600
    try:
        os.write(fd, seed.hex().encode("ascii") + b"\n")
        os.fsync(fd)
        os.close(fd)
        fd = -1
        try:
            os.link(tmp, path)  # fails if another process created it first; theirs wins
        except FileExistsError:
            pass
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if fd >= 0:
            os.close(fd)
        os.unlink(tmp)


def _read_seed(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise NodeKeyError(f"node key {path} does not exist") from None
    except OSError as exc:  # ELOOP: a symlink, refused (T-RCPT-1)
        raise NodeKeyError(f"node key {path} cannot be opened safely: {exc.strerror}") from None
    try:
        st = os.fstat(fd)  # fstat the open file, not the path: no swap in between
        if not stat.S_ISREG(st.st_mode):
            raise NodeKeyError(f"node key {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise NodeKeyError(f"node key {path} is not owned by this user (uid {os.geteuid()})")
        if stat.S_IMODE(st.st_mode) & 0o077:
            # T-RCPT-1: a key others can read lets them forge receipts.
            raise NodeKeyError(
                f"node key {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must not be "
                f"readable or writable by group or others (run: chmod 600 {path})"
            )
        raw = os.read(fd, 200)
    finally:
        os.close(fd)
    if len(raw) == 32:
        return raw
    text = raw.strip()
    try:
        seed = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        seed = b""
    if len(seed) != 32:
        raise NodeKeyError(f"node key {path} is not a 32-byte Ed25519 seed (64 hex characters)")
    return seed
