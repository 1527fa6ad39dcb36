"""The stdlib Ed25519 verifier (T-SUPPLY-2): RFC 8032 vectors and agreement with PyNaCl."""
from __future__ import annotations

import hashlib
import os

import pytest
from nacl.signing import SigningKey

from installer import ed25519

# RFC 8032 §7.1: TEST 1, 2, 3 and SHA(abc).
RFC8032 = [
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
     "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
    ("833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
     "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
     hashlib.sha512(b"abc").hexdigest(),
     "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b58909351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704"),
]


@pytest.mark.parametrize("seed,public,message,signature", RFC8032)
def test_rfc8032_vectors(seed: str, public: str, message: str, signature: str) -> None:
    pk, msg, sig = bytes.fromhex(public), bytes.fromhex(message), bytes.fromhex(signature)
    assert ed25519.public_key(bytes.fromhex(seed)) == pk
    assert ed25519.sign(bytes.fromhex(seed), msg) == sig
    assert ed25519.verify(pk, msg, sig)
    assert not ed25519.verify(pk, msg + b"\x00", sig)


@pytest.mark.parametrize("length", [0, 1, 32, 64, 1000])
def test_agrees_with_pynacl(length: int) -> None:
    key = SigningKey(os.urandom(32))
    msg = os.urandom(length)
    sig = key.sign(msg).signature
    assert ed25519.verify(bytes(key.verify_key), msg, sig)
    assert ed25519.sign(bytes(key), msg) == sig
    assert ed25519.public_key(bytes(key)) == bytes(key.verify_key)
    key.verify_key.verify(msg, ed25519.sign(bytes(key), msg))  # PyNaCl accepts ours


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 1]) + data[index + 1:]


@pytest.mark.parametrize("index", [0, 31, 32, 63])
def test_t_supply_2_flipped_signature_bit_rejected(index: int) -> None:
    key = SigningKey(os.urandom(32))
    sig = key.sign(b"bundle").signature
    assert not ed25519.verify(bytes(key.verify_key), b"bundle", _flip(sig, index))


def test_t_supply_2_malleable_s_rejected() -> None:
    key = SigningKey(os.urandom(32))
    sig = key.sign(b"bundle").signature
    s = int.from_bytes(sig[32:], "little") + ed25519.L
    assert s < 2**256
    forged = sig[:32] + s.to_bytes(32, "little")
    assert not ed25519.verify(bytes(key.verify_key), b"bundle", forged)


def test_t_supply_2_wrong_key_and_garbage_rejected() -> None:
    key, other = SigningKey(os.urandom(32)), SigningKey(os.urandom(32))
    sig = key.sign(b"m").signature
    assert not ed25519.verify(bytes(other.verify_key), b"m", sig)
    assert not ed25519.verify(b"\x00" * 31, b"m", sig)
    assert not ed25519.verify(bytes(key.verify_key), b"m", sig[:63])
    assert not ed25519.verify(b"\xff" * 32, b"m", sig)  # y >= p: not a canonical point


def test_t_supply_2_small_order_key_rejected() -> None:
    # The identity point (y = 1) has order 1: with R = identity and S = 0 it
    # "verifies" every message unless small-order keys are refused.
    identity = (1).to_bytes(32, "little")
    forged = identity + bytes(32)
    assert not ed25519.verify(identity, b"anything", forged)
