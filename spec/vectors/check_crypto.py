#!/usr/bin/env python3
"""An independent decoder for spec/vectors/crypto.json, written from spec/format.md §18
alone (Python `cryptography` >= 44 for the primitives), so that the spec, not the Rust
crate, is what the vectors test.

    python3 spec/vectors/check_crypto.py [spec/vectors/crypto.json]
"""
import hashlib
import hmac
import json
import struct
import sys

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

ENVELOPE_MAGIC = hashlib.sha256(b"bkimg envelope v1").digest()[:8]
SLOT_MAGIC = hashlib.sha256(b"bkimg key slot v1").digest()[:8]
KINDS = {"chunk": 1, "index": 2, "manifest": 3, "prune-record": 4, "config": 5}
AEADS = {1: AESGCM, 2: ChaCha20Poly1305}


def hkdf(ikm, salt, info):
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def derive(master, repo_id):
    salt = repo_id.encode()
    return {
        "chunk_id_key": hkdf(master, salt, b"bkimg chunk id key v1"),
        "data_key": hkdf(master, salt, b"bkimg data key v1"),
        "mac_key": hkdf(master, salt, b"bkimg mac key v1"),
    }


def chunk_id(keys, plain):
    if plain.count(0) == len(plain):
        return bytes(32)
    return hmac.new(keys["chunk_id_key"], plain, hashlib.sha256).digest()


def object_key(keys, alg, kind, name):
    return hkdf(keys["data_key"], b"", b"bkimg object key v1" + bytes([alg, kind]) + name.encode())


class Refused(Exception):
    def __init__(self, cls):
        self.cls = cls


def open_envelope(keys, kind, name, sealed):
    if len(sealed) < 40 or sealed[:8] != ENVELOPE_MAGIC:
        raise Refused("corrupt")
    if sealed[8] not in AEADS:
        raise Refused("unsupported")
    if sealed[9] != kind or sealed[10:12] != b"\0\0":
        raise Refused("corrupt")
    aead = AEADS[sealed[8]](object_key(keys, sealed[8], kind, name))
    try:
        return aead.decrypt(sealed[12:24], sealed[24:], sealed[:24] + name.encode())
    except InvalidTag:
        raise Refused("corrupt")


STREAM_MAGIC = hashlib.sha256(b"bkimg envelope stream v1").digest()[:8]
MAC_MAGIC = hashlib.sha256(b"bkimg mac envelope v1").digest()[:8]
SEGMENT = 1 << 20


def open_stream(keys, kind, name, sealed):
    """§18.4.1: header, then segments of nonce || ciphertext || tag."""
    header = sealed[:12]
    if len(header) < 12 or header[:8] != STREAM_MAGIC:
        raise Refused("corrupt")
    if header[8] not in AEADS:
        raise Refused("unsupported")
    if header[9] != kind or header[10] != 0:
        raise Refused("corrupt")
    if header[11] != 20:
        raise Refused("unsupported")
    aead = AEADS[header[8]](object_key(keys, header[8], kind, name))
    rest, out, k = sealed[12:], b"", 0
    while True:
        seg = rest[:12 + SEGMENT + 16]
        rest = rest[len(seg):]
        last = len(rest) == 0
        if len(seg) < 28:
            raise Refused("corrupt")
        ad = header + struct.pack("<Q", k) + bytes([last]) + name.encode()
        try:
            out += aead.decrypt(seg[:12], seg[12:], ad)
        except InvalidTag:
            raise Refused("corrupt")
        if last:
            return out
        k += 1


def seal_stream(keys, alg, kind, name, plain):
    """As a writer would with the vectors' fixed nonces (segment k: 12 bytes of 0x30 + k)."""
    header = STREAM_MAGIC + bytes([alg, kind, 0, 20])
    aead = AEADS[alg](object_key(keys, alg, kind, name))
    parts = [plain[i:i + SEGMENT] for i in range(0, len(plain), SEGMENT)] or [b""]
    out = header
    for k, part in enumerate(parts):
        nonce = bytes([(0x30 + k) % 256]) * 12
        ad = header + struct.pack("<Q", k) + bytes([k == len(parts) - 1]) + name.encode()
        out += nonce + aead.encrypt(nonce, part, ad)
    return out


def open_mac_envelope(keys, kind, name, sealed):
    if len(sealed) < 44 or sealed[:8] != MAC_MAGIC or sealed[8] != kind or sealed[9:12] != b"\0\0\0":
        raise Refused("corrupt")
    content, tag = sealed[12:-32], sealed[-32:]
    msg = b"bkimg object mac v1" + bytes([kind]) + struct.pack("<I", len(name)) + name.encode() + content
    if not hmac.compare_digest(hmac.new(keys["mac_key"], msg, hashlib.sha256).digest(), tag):
        raise Refused("corrupt")
    return content


def sealed_body(doc):
    assert doc[:8] == SLOT_MAGIC and struct.unpack_from("<I", doc, 8)[0] == 1
    (length,) = struct.unpack_from("<Q", doc, 24)
    body = doc[64:]
    assert len(body) == length and hashlib.sha256(body).digest() == doc[32:64]
    return json.loads(body)


def unlock(slot, passphrase=None, key_file=None):
    kdf = slot["kdf"]
    salt = bytes.fromhex(kdf["salt"])
    if kdf["algorithm"] == "argon2id":
        kind = "passphrase"
        line = "argon2id v=19 m={} t={} p={} salt={}".format(
            kdf["memory_kib"], kdf["iterations"], kdf["parallelism"], kdf["salt"])
        kek = Argon2id(salt=salt, length=32, iterations=kdf["iterations"],
                       lanes=kdf["parallelism"], memory_cost=kdf["memory_kib"]).derive(passphrase)
    else:
        kind = "key-file"
        line = "hkdf-sha256 salt=" + kdf["salt"]
        kek = hkdf(key_file, salt, b"bkimg key file slot v1")
    ad = "\n".join(["bkimg key slot v1", slot["repository_id"], slot["slot_id"], kind, line])
    w = slot["wrapped"]
    assert w["algorithm"] == "chacha20-poly1305"
    return ChaCha20Poly1305(kek).decrypt(bytes.fromhex(w["nonce"]), bytes.fromhex(w["ciphertext"]),
                                         ad.encode())


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "spec/vectors/crypto.json"
    v = json.load(open(path))
    master = bytes.fromhex(v["master_key"])
    keys = derive(master, v["repository_id"])
    for name, key in keys.items():
        assert key.hex() == v["derived"][name], name
    check = hmac.new(keys["mac_key"], b"bkimg key check v1", hashlib.sha256).hexdigest()
    assert check == v["derived"]["key_check"]
    content = v["derived"]["config_mac_content"].encode()
    rid = v["repository_id"].encode()
    msg = b"bkimg object mac v1" + bytes([5]) + struct.pack("<I", len(rid)) + rid + content
    assert hmac.new(keys["mac_key"], msg, hashlib.sha256).hexdigest() == v["derived"]["config_mac"]
    for c in v["chunk_ids"]:
        assert chunk_id(keys, bytes.fromhex(c["plaintext_hex"])).hex() == c["id"], c["name"]
    for e in v["valid"]:
        kind = KINDS[e["kind"]]
        sealed = bytes.fromhex(e["sealed_hex"])
        assert object_key(keys, sealed[8], kind, e["object_name"]).hex() == e["object_key"]
        assert open_envelope(keys, kind, e["object_name"], sealed).hex() == e["plaintext_hex"], e["name"]
    for e in v["invalid"]:
        try:
            open_envelope(keys, KINDS[e["kind"]], e["object_name"], bytes.fromhex(e["sealed_hex"]))
            raise AssertionError(e["name"] + " was accepted")
        except Refused as r:
            assert r.cls == e["error"], (e["name"], r.cls)
    for m in v["macs"]:
        name = m["object_name"].encode()
        msg = (b"bkimg object mac v1" + bytes([KINDS[m["kind"]]]) + struct.pack("<I", len(name))
               + name + bytes.fromhex(m["content_hex"]))
        assert hmac.new(keys["mac_key"], msg, hashlib.sha256).hexdigest() == m["mac"]
    for e in v["streams"]:
        plain = bytes(i % 251 for i in range(e["plaintext_len"]))
        alg = {"aes-256-gcm": 1, "chacha20-poly1305": 2}[e["aead"]]
        sealed = seal_stream(keys, alg, KINDS[e["kind"]], e["object_name"], plain)
        assert len(sealed) == e["sealed_len"], e["name"]
        assert hashlib.sha256(sealed).hexdigest() == e["sealed_sha256"], e["name"]
        if "sealed_hex" in e:
            assert sealed.hex() == e["sealed_hex"], e["name"]
        assert open_stream(keys, KINDS[e["kind"]], e["object_name"], sealed) == plain, e["name"]
    for e in v["invalid_streams"]:
        plain = bytes(i % 251 for i in range(SEGMENT + 5))
        cut = seal_stream(keys, 2, KINDS["index"], e["object_name"], plain)[:e["sealed_len"]]
        assert hashlib.sha256(cut).hexdigest() == e["sealed_sha256"], e["name"]
        try:
            open_stream(keys, KINDS["index"], e["object_name"], cut)
            raise AssertionError(e["name"] + " was accepted")
        except Refused as r:
            assert r.cls == e["error"], (e["name"], r.cls)
    for m in v["mac_envelopes"]:
        sealed = bytes.fromhex(m["sealed_hex"])
        content = open_mac_envelope(keys, KINDS[m["kind"]], m["object_name"], sealed)
        assert content.hex() == m["content_hex"]
    for s in v["slots"]:
        body = sealed_body(bytes.fromhex(s["document_hex"]))
        assert body == s["body"]
        if "passphrase" in s:
            assert unlock(body, passphrase=s["passphrase"].encode()) == master
            try:
                unlock(body, passphrase=s["wrong_passphrase"].encode())
                raise AssertionError("wrong passphrase accepted")
            except InvalidTag:
                pass
        else:
            assert unlock(body, key_file=bytes.fromhex(s["key_file_hex"])) == master
    print("crypto.json: all vectors pass")


if __name__ == "__main__":
    main()
