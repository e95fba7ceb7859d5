#!/usr/bin/env python3
"""An independent decoder for spec/vectors/crypto.json and for the whole protected export
spec/vectors/protected-export.json names, written from spec/format.md (§4, §5, §6, §10 and
§18) alone (Python `cryptography` >= 44 for the primitives), so that the spec, not the Rust
crate, is what the vectors test.

    python3 spec/vectors/check_crypto.py [spec/vectors/crypto.json [protected-export.json]]
"""
import hashlib
import hmac
import json
import os
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


def magic(text):
    return hashlib.sha256(text.encode()).digest()[:8]


def sealed_doc(doc, magic_bytes):
    """§6.3: a sealed document's JSON body (config, manifest, key slot)."""
    if len(doc) < 64 or doc[:8] != magic_bytes:
        raise Refused("corrupt")
    if struct.unpack_from("<I", doc, 8)[0] != 1:
        raise Refused("unsupported")
    (length,) = struct.unpack_from("<Q", doc, 24)
    body = doc[64:]
    if doc[20:24] != bytes(4) or len(body) != length or hashlib.sha256(body).digest() != doc[32:64]:
        raise Refused("corrupt")
    return json.loads(body)


def export_objects(data):
    """§10.1-10.3: the objects of a protected export by (kind, key), after every check of
    the container."""
    if len(data) < 128 or data[:8] != bytes.fromhex("2ef4dbb08cd49605"):
        raise Refused("corrupt")
    head_version, head_flags = struct.unpack_from("<II", data, 8)
    tail = data[-64:]
    if tail[:8] != bytes.fromhex("ecd521507725e658"):
        raise Refused("corrupt")
    version, flags, dir_off, count = struct.unpack_from("<IIQQ", tail, 8)
    if head_version != 1 or version != 1 or head_flags & ~1 or flags & ~1:
        raise Refused("unsupported")
    if head_flags != flags or flags != 1 or data[16:64] != bytes(48):
        raise Refused("corrupt")
    if dir_off < 64 or dir_off + 56 * count != len(data) - 64:
        raise Refused("corrupt")
    directory = data[dir_off:dir_off + 56 * count]
    if hashlib.sha256(directory).digest() != tail[32:64]:
        raise Refused("corrupt")
    objects, previous = {}, None
    for i in range(count):
        e = directory[56 * i:56 * i + 56]
        kind, key = e[0], e[8:40]
        offset, length = struct.unpack_from("<QQ", e, 40)
        if kind not in range(1, 9) or e[1:8] != bytes(7) or offset < 64 or offset + length > dir_off:
            raise Refused("corrupt")
        if previous is not None and (kind, key) <= previous:
            raise Refused("corrupt")
        previous = (kind, key)
        objects[(kind, key)] = data[offset:offset + length]
    return objects


def read_protected_export(data, key_file):
    """Opens a protected export with a key file and returns (point id, {disk name: bytes})."""
    objects = export_objects(data)
    config = sealed_doc(objects[(6, bytes(32))], magic("bkimg repository v1"))
    repo_id, enc = config["repository_id"], config["encryption"]
    master = None
    for (kind, key), slot_doc in objects.items():
        if kind != 7:
            continue
        slot = sealed_doc(slot_doc, SLOT_MAGIC)
        if hashlib.sha256(slot["slot_id"].encode()).digest() != key or slot["repository_id"] != repo_id:
            raise Refused("corrupt")
        if slot["kdf"]["algorithm"] != "argon2id":
            try:
                master = unlock(slot, key_file=key_file)
            except InvalidTag:
                continue
    if master is None:
        raise Refused("denied")
    keys = derive(master, repo_id)
    if hmac.new(keys["mac_key"], b"bkimg key check v1", hashlib.sha256).hexdigest() != enc["key_check"]:
        raise Refused("corrupt")
    (point_key, id_bytes), = [(k, v) for (kind, k), v in objects.items() if kind == 8]
    point = id_bytes.decode()
    if hashlib.sha256(id_bytes).digest() != point_key:
        raise Refused("corrupt")
    manifest = sealed_doc(open_envelope(keys, 3, point, objects[(3, point_key)]),
                          magic("bkimg manifest v1"))
    if manifest["id"] != point:
        raise Refused("corrupt")
    cs = manifest["chunk_size"]
    disks = {}
    for disk in manifest["disks"]:
        image = bytearray(disk["size"])
        for vol in disk["volumes"]:
            content = vol["content"]
            if content["kind"] != "data":
                continue
            index_id = bytes.fromhex(content["index"])
            index = open_stream(keys, 2, content["index"], objects[(2, index_id)])
            if hashlib.sha256(index[:128]).digest() != index_id or index[:8] != bytes.fromhex("04253d11bb794836"):
                raise Refused("corrupt")
            (count,) = struct.unpack_from("<Q", index, 32)
            entries = index[128:]
            if len(entries) != 32 * count or hashlib.sha256(entries).digest() != index[40:72]:
                raise Refused("corrupt")
            for i in range(count):
                cid = entries[32 * i:32 * i + 32]
                if cid == bytes(32):
                    continue
                blob = open_envelope(keys, 1, cid.hex(), objects[(1, cid)])
                if blob[:8] != bytes.fromhex("8aec837983ce77dc") or blob[24:56] != cid:
                    raise Refused("corrupt")
                compression, plain_len, stored_len = blob[8], *struct.unpack_from("<II", blob, 12)
                if compression != 0:
                    raise Refused("unsupported")  # the vector stores chunks plain (no zstd here)
                plain = blob[64:]
                if len(plain) != stored_len or stored_len != plain_len or chunk_id(keys, plain) != cid:
                    raise Refused("corrupt")
                at = vol["offset"] + i * cs
                image[at:at + len(plain)] = plain
        disks[disk["name"]] = bytes(image)
    return point, disks


def check_protected_export(path):
    v = json.load(open(path))
    data = open(os.path.join(os.path.dirname(path), v["file"]), "rb").read()
    key_file = bytes.fromhex(v["key_file_hex"])
    point, disks = read_protected_export(data, key_file)
    assert point == v["point_id"], point
    disk = disks[v["disk"]["name"]]
    assert len(disk) == v["disk"]["size"] and hashlib.sha256(disk).hexdigest() == v["disk"]["sha256"]
    # Another key opens nothing; a changed byte anywhere in an object, or the directory, or
    # the trailer is refused (or, in a byte the format leaves free, changes nothing read).
    try:
        read_protected_export(data, bytes(32))
        raise AssertionError("another key file opened the export")
    except Refused as r:
        assert r.cls == "denied", r.cls
    refused = 0
    for at in range(64, len(data), 31):
        changed = bytearray(data)
        changed[at] ^= 0x40
        try:
            assert read_protected_export(bytes(changed), key_file) != (point, disks), at
        except (Refused, InvalidTag, KeyError, ValueError, UnicodeDecodeError):
            refused += 1
    assert refused == len(range(64, len(data), 31)), "a changed byte was read as valid"
    print("{}: the export opens with its key file, restores to its disk, and {} changed "
          "bytes are refused".format(os.path.basename(path), refused))


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
    export = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(path), "protected-export.json")
    check_protected_export(export)


if __name__ == "__main__":
    main()
