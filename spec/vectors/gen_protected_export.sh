#!/bin/sh
# Writes spec/vectors/protected-export.bkimg and protected-export.json: a whole protected
# export (spec/format.md §10.3) of an encrypted repository, made by the bkimg binary, with
# the key file that opens it and what it must restore to. Checked by the reference
# (tests/tests/vectors_export.rs) and by check_crypto.py, the independent decoder.
#
# The repository's master key, ids and nonces are random: each run writes other bytes
# that mean the same. The disk is fixed: 24 KiB in 4 KiB chunks, stored uncompressed
# (level 0), so that a decoder needs no zstd: text, a chunk of zeros (a hole), noise, the
# same text again (stored once), noise and zeros.
#
#   spec/vectors/gen_protected_export.sh [DIR] (BKIMG=path/to/bkimg, default target/debug)
set -eu
out=${1:-spec/vectors}
bkimg=${BKIMG:-target/debug/bkimg}
t=$(mktemp -d)
trap 'rm -rf "$t"' EXIT
export BKIMG_STATE_DIR="$t/state"
python3 - "$t/disk.img" <<'PY'
import hashlib, sys
text = (b"bkimg protected export vector: " * 200)[:4096]
def noise(seed):
    out = b""
    while len(out) < 4096:
        out += hashlib.sha256(b"%s %d" % (seed, len(out))).digest()
    return out[:4096]
open(sys.argv[1], "wb").write(text + bytes(4096) + noise(b"a") + text + noise(b"b") + bytes(4096))
PY
"$bkimg" key init --repo "$t/repo" --no-passphrase --key-file-out "$t/key" >/dev/null
"$bkimg" capture --repo "$t/repo" --key-file "$t/key" --chunk-size 4K --level 0 --raw -q \
    "$t/disk.img" >/dev/null
rm -f "$out/protected-export.bkimg"
"$bkimg" export --repo "$t/repo" --key-file "$t/key" -o "$out/protected-export.bkimg" -q \
    >/dev/null
id=$("$bkimg" list --repo "$t/repo" --key-file "$t/key" --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
python3 - "$t/key" "$t/disk.img" "$id" "$out/protected-export.json" <<'PY'
import hashlib, json, sys
key, disk, point, out = sys.argv[1:]
data = open(disk, "rb").read()
json.dump({
    "vectors": "a whole protected export (spec/format.md §10.3) of an encrypted repository",
    "generated_by": "spec/vectors/gen_protected_export.sh",
    "file": "protected-export.bkimg",
    "key_file_hex": open(key, "rb").read().hex(),
    "point_id": point,
    "disk": {"name": "disk0", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()},
    "notes": "Opened with key_file (its kind-7 slot), the kind-3 manifest names one disk "
             "of one volume, whose index (kind 2, a segmented envelope) lists 6 chunk ids: "
             "the zero id for the two holes, the same id twice for the repeated text, "
             "so 3 chunks (kind 1) are stored. Changing "
             "any byte of any object must make the export fail to open or to verify.",
}, open(out, "w"), indent=2)
open(out, "a").write("\n")
PY
