#!/bin/sh
# Smoke test of the bksnap userspace commands against a loaded module (run as root in the
# test VM): tracking, a snapshot whose image keeps its content while the device changes,
# saved state, and two live captures where the second reads only what changed.
# Usage: kmod/user/smoke.sh DEV STORE_DIR [BKIMG]
#   DEV        a scratch block device (its content is destroyed), e.g. /dev/vdb
#   STORE_DIR  a directory on ext4 on another device, for store files and the repository
set -eu
dev=$1
dir=$2
bkimg=${3:-bkimg}
fail() { echo "smoke: FAIL: $*" >&2; exit 1; }
step() { echo "smoke: $*" >&2; }

[ -b "$dev" ] || fail "$dev is not a block device"
[ -e /dev/bksnap ] || fail "/dev/bksnap missing: load the module first"
repo=$dir/smoke-repo
rm -rf "$repo" "$dir"/smoke-*.store "$dir"/smoke.cbt "$dir"/smoke.map

step "a fresh pattern on $dev"
dd if=/dev/urandom of="$dev" bs=1M count=16 conv=fsync 2>/dev/null
"$bkimg" cbt detach "$dev" 2>/dev/null || true

step "cbt attach / status"
"$bkimg" cbt attach "$dev" --json | grep -q '"sequence": 1' || fail "attach: sequence 1"
"$bkimg" cbt status "$dev" --json | grep -q '"snapshot": null' || fail "status"

step "snapshot create: the image keeps the old content while the device changes"
id=$("$bkimg" snapshot create "$dev" --store "$dir/smoke-a.store" --store-size 64M)
img=/dev/bksnap$id-0
before=$(dd if="$img" bs=1M count=16 2>/dev/null | sha256sum)
dd if=/dev/urandom of="$dev" bs=1M count=4 seek=2 conv=fsync 2>/dev/null
after=$(dd if="$img" bs=1M count=16 2>/dev/null | sha256sum)
[ "$before" = "$after" ] || fail "the image changed when the device was written"
"$bkimg" snapshot info "$id" --json | grep -q '"state": "active"' || fail "info: active"
"$bkimg" cbt detach "$dev" 2>/dev/null && fail "detach must be refused while held"

step "cbt map: the 4 MiB written since snapshot 1"
seq=$("$bkimg" snapshot info "$id" --json | sed -n 's/.*"sequence": \([0-9]*\).*/\1/p' | head -1)
[ "$seq" = 1 ] || fail "snapshot sequence $seq, expected 1"
"$bkimg" snapshot destroy "$id" --store "$dir/smoke-a.store"
[ -e "$dir/smoke-a.store" ] && fail "store not removed"
[ -e "$img" ] && fail "image still there after destroy"
gen=$("$bkimg" cbt status "$dev" --json | sed -n 's/.*"generation": "\([0-9a-f]*\)".*/\1/p')
"$bkimg" cbt map "$dev" --from 1 -o "$dir/smoke.map" --generation "$gen" --json \
    | grep -q '"bytes_changed": 4194304' || fail "map from 1: the 4 MiB written"
"$bkimg" cbt map "$dev" --from 1 --to 2 -o "$dir/smoke.map" 2>/dev/null \
    && fail "a map up to the active sequence must be refused"
set +e
"$bkimg" cbt map "$dev" --from 1 -o "$dir/smoke.map" --generation 0123456789abcdef0123456789abcdef 2>/dev/null
rc=$?
set -e
[ "$rc" = 7 ] || fail "a wrong generation: exit $rc, expected 7"

step "cbt detach --save / restore"
"$bkimg" cbt detach "$dev" --save "$dir/smoke.cbt"
"$bkimg" cbt restore "$dev" "$dir/smoke.cbt" --json | grep -q "\"generation\": \"$gen\"" \
    || fail "restore: same generation"
[ -e "$dir/smoke.cbt" ] && fail "a restored state file must be removed"

step "capture --live twice: the second reads only what changed"
"$bkimg" capture --repo "$repo" --live --store "$dir/smoke-b.store" --store-size 64M \
    --json "$dev" >"$dir/smoke.json"
grep -q "\"source\": \"$dev\"" "$dir/smoke.json" || fail "live capture records $dev"
dd if=/dev/urandom of="$dev" bs=64K count=1 seek=100 conv=fsync 2>/dev/null
"$bkimg" capture --repo "$repo" --live --parent latest --store "$dir/smoke-c.store" --store-size 64M \
    --json "$dev" >"$dir/smoke.json"
grep -q '"mode": "changed-blocks"' "$dir/smoke.json" || fail "second capture: changed-blocks"
ls "$dir"/smoke-*.store 2>/dev/null && fail "store files left behind"
"$bkimg" snapshot list --json | grep -q '"id"' && fail "snapshots left behind"

step "restore the latest point and compare"
"$bkimg" restore --repo "$repo" latest --target "$dir/smoke.img" --json >/dev/null
[ "$(sha256sum <"$dev")" = "$(sha256sum <"$dir/smoke.img")" ] || fail "restored content differs"
rm -rf "$repo" "$dir/smoke.img" "$dir/smoke.map" "$dir/smoke.json"
step "ok"
