#!/bin/sh
# The VM test suite (run by vm/init inside the test VM). Each test is a shell function
# named t_NAME; it fails by returning non-zero (or by a kernel warning, which panics the
# VM). Usage: tests.sh [all | NAME...]
passed=0
failed=0

log() { echo "  $*"; }
die() { echo "  FAILED: $*"; return 1; }

# Fill a device range with a recognisable pattern: dd of /dev/urandom is slow under
# emulation; a repeated seeded block is enough to tell versions apart.
pattern() { # SEED MIB -> stdout
    local n=0
    yes "bksnap pattern $1" | head -c 1048576 >/tmp/pat.$$
    while [ $n -lt "$2" ]; do cat /tmp/pat.$$; n=$((n + 1)); done
    rm -f /tmp/pat.$$
}

devnum() { # DEV -> MAJOR:MINOR
    cat "/sys/class/block/$(basename "$1")/dev"
}

t_load() {
    [ -c /dev/bksnap ] || die "/dev/bksnap missing" || return 1
    grep -q '^bksnap ' /proc/modules || die "module not listed" || return 1
}

# First value of a JSON key in stdin (numbers and strings; enough for bkimg's output).
jget() {
    tr -d '\n' | sed -n "s/^[^\"]*\"$1\": *\"\{0,1\}\([^\",} ]*\).*/\1/p; s/.*\"$1\": *\"\{0,1\}\([^\",} ]*\).*/\1/p" | head -1
}

# A raw-device writer: block k (of N 4 KiB blocks from block FIRST) gets "seq i" for
# i = 0, 1, ... in order, each write synchronous (O_DIRECT), until /tmp/stop-DEV exists.
# With DEV2, writes alternate between DEV and DEV2 (one global sequence).
writer() { # DEV N FIRST [DEV2]
    local i=0 d k
    while [ ! -e /tmp/stop ]; do
        d=$1
        if [ -n "$4" ] && [ $((i % 2)) = 1 ]; then d=$4; fi
        if [ -n "$4" ]; then k=$((i / 2 % $2)); else k=$((i % $2)); fi
        printf 'seq %08d\n' $i | dd of="$d" bs=4096 seek=$(($3 + k)) count=1 conv=sync,notrunc oflag=direct 2>/dev/null
        i=$((i + 1))
    done
}

# Prints the sequence numbers found in blocks FIRST..FIRST+N-1 of an image, one per line.
seqs() { # IMAGE N FIRST
    local k=0 v
    while [ $k -lt "$2" ]; do
        v=$(dd if="$1" bs=4096 skip=$(($3 + k)) count=1 2>/dev/null | head -c 12)
        case "$v" in "seq "*) echo "${v#seq }" | sed 's/^0*\([0-9]\)/\1/' ;; *) echo -1 ;; esac
        k=$((k + 1))
    done
}

# Checks that the blocks of one or two devices (as written by `writer`) show exactly the
# writes up to one instant: with M the highest sequence seen, every block holds the last
# write to it at or before M.
consistent() { # STRIDE N FILE...  (files: seqs of each device, in writer order)
    stride=$1 n=$2
    shift 2
    max=$(cat "$@" | sort -n | tail -1)
    [ "$max" -ge 0 ] || { echo "  no writes seen"; return 1; }
    dev=0
    for f in "$@"; do
        k=0
        while read -r v; do
            # The last i <= max with i / stride % n == k and i % stride == dev.
            round=$(( (max - dev) / stride ))
            base=$(( round - (round % n) + k ))
            [ $base -gt "$round" ] && base=$((base - n))
            if [ $base -lt 0 ]; then want=-1; else want=$((base * stride + dev)); fi
            [ "$v" = "$want" ] || { echo "  device $dev block $k: seq $v, expected $want (max $max)"; return 1; }
            k=$((k + 1))
        done <"$f"
        dev=$((dev + 1))
    done
}

# After each test: nothing it left behind may break the next one.
cleanup() {
    touch /tmp/stop
    for m in /mnt/r2 /mnt/r /mnt/fs; do grep -q " $m " /proc/mounts && umount "$m"; done
    grep -q " /mnt/st " /proc/mounts && fsfreeze --unfreeze /mnt/st 2>/dev/null
    for m in /mnt/st2 /mnt/st; do grep -q " $m " /proc/mounts && umount "$m"; done
    losetup -d /dev/loop1 2>/dev/null
    losetup -d /dev/loop0 2>/dev/null
    for id in $(bkimg snapshot list --json 2>/dev/null | tr -d '\n ' | sed 's/"id":/\n/g' | sed -n 's/^\([0-9][0-9]*\).*/\1/p'); do
        bkimg snapshot destroy "$id" >/dev/null 2>&1
    done
    for d in vda vdb vdc loop0; do bkimg cbt detach /dev/$d >/dev/null 2>&1; done
    # Stores are immutable while they exist (a test that failed may leave one).
    chattr -i /repo/*.store 2>/dev/null
    rm -f /repo/*.store /tmp/stop
    grep -q '^bksnap ' /proc/modules || insmod /root/bksnap.ko
}

setup_repo() {
    grep -q ' /repo ' /proc/mounts && return 0
    mkfs.ext4 -q -F /dev/vdd >/dev/null && mkdir -p /repo && mount -t ext4 /dev/vdd /repo
}

t_untracked_writes() {
    # The hook is in every write's path: untracked devices must be unaffected.
    pattern a 8 >/tmp/expect
    dd if=/tmp/expect of=/dev/vda bs=1M conv=fsync 2>/dev/null
    dd if=/dev/vda bs=1M count=8 2>/dev/null | cmp -s - /tmp/expect || die "read back differs"
    rm -f /tmp/expect
}

t_cbt_basic() {
    bkimg cbt attach /dev/vdb --json >/tmp/a.json || die "attach" || return 1
    [ "$(jget sequence </tmp/a.json)" = 1 ] || die "sequence $(jget sequence </tmp/a.json)" || return 1
    bkimg cbt attach /dev/vdb 2>/dev/null && { die "a second attach must be refused"; return 1; }
    pattern b 1 | dd of=/dev/vdb bs=1M seek=10 conv=fsync 2>/dev/null
    id=$(bkimg snapshot create /dev/vdb --store /repo/s.store --store-size 16M) || die "snapshot" || return 1
    bkimg snapshot destroy "$id" --store /repo/s.store >/dev/null || die "destroy" || return 1
    bkimg cbt map /dev/vdb --from 0 -o /tmp/m.map --json >/tmp/m.json || die "map" || return 1
    [ "$(jget bytes_changed </tmp/m.json)" = 1048576 ] || die "map from 0: $(cat /tmp/m.json)" || return 1
    bkimg cbt map /dev/vdb --from 1 -o /tmp/m.map --json >/tmp/m.json || die "map 1" || return 1
    [ "$(jget bytes_changed </tmp/m.json)" = 0 ] || die "map from 1 not empty: $(cat /tmp/m.json)" || return 1
    pattern c 1 | dd of=/dev/vdb bs=64K count=3 seek=4 conv=fsync 2>/dev/null
    id=$(bkimg snapshot create /dev/vdb --store /repo/s.store --store-size 16M) || return 1
    bkimg snapshot destroy "$id" --store /repo/s.store >/dev/null
    bkimg cbt map /dev/vdb --from 1 -o /tmp/m.map --json >/tmp/m.json || return 1
    [ "$(jget bytes_changed </tmp/m.json)" = 196608 ] || die "map from 1: $(cat /tmp/m.json)" || return 1
    bkimg cbt detach /dev/vdb >/dev/null || die "detach"
}

t_snapshot_cow() {
    pattern old 32 | dd of=/dev/vdb bs=1M conv=fsync 2>/dev/null
    id=$(bkimg snapshot create /dev/vdb --store /repo/s.store --store-size 64M) || die "create" || return 1
    img=/dev/bksnap$id-0
    [ -b "$img" ] || die "no image $img" || return 1
    before=$(dd if="$img" bs=1M count=32 2>/dev/null | sha256sum)
    pattern new 8 | dd of=/dev/vdb bs=1M seek=3 conv=fsync 2>/dev/null
    pattern new 1 | dd of=/dev/vdb bs=4K seek=5000 conv=fsync 2>/dev/null
    # Rewrites of copied chunks cost nothing more: the count must not change.
    c1=$(bkimg snapshot info "$id" --json | jget copied_chunks)
    pattern newer 8 | dd of=/dev/vdb bs=1M seek=3 conv=fsync 2>/dev/null
    c2=$(bkimg snapshot info "$id" --json | jget copied_chunks)
    after=$(dd if="$img" bs=1M count=32 2>/dev/null | sha256sum)
    expect=$(pattern old 32 | sha256sum)
    bkimg snapshot destroy "$id" --store /repo/s.store >/dev/null
    [ "$before" = "$expect" ] || die "image differs from the device at the snapshot" || return 1
    [ "$after" = "$expect" ] || die "image changed after writes to the device" || return 1
    [ "$c1" = "$c2" ] || die "rewrites copied again: $c1 then $c2 chunks" || return 1
    [ ! -e "$img" ] || die "image left after destroy" || return 1
    [ "$(dd if=/dev/vdb bs=1M skip=3 count=8 2>/dev/null | sha256sum)" = "$(pattern newer 8 | sha256sum)" ] \
        || die "the device does not hold what was written"
}

t_consistency_raw() {
    # A writer keeps overwriting 256 blocks while the snapshot is taken and captured.
    dd if=/dev/zero of=/dev/vda bs=1M count=2 conv=fsync 2>/dev/null
    rm -f /tmp/stop
    writer /dev/vda 256 0 &
    wpid=$!
    sleep 3
    bkimg capture --repo /repo/r-raw --live --store /repo/live.store --store-size 32M --json /dev/vda >/tmp/c.json \
        || { touch /tmp/stop; wait $wpid; die "live capture"; return 1; }
    sleep 1
    touch /tmp/stop
    wait $wpid
    rm -f /repo/raw.img
    bkimg restore --repo /repo/r-raw latest --target /repo/raw.img --json >/dev/null || die "restore" || return 1
    seqs /repo/raw.img 256 0 >/tmp/s0
    log "captured writes up to seq $(sort -n /tmp/s0 | tail -1); device at $(seqs /dev/vda 256 0 | sort -n | tail -1)"
    consistent 1 256 /tmp/s0 || die "the restored image is not the device at one instant" || return 1
    rm -rf /repo/raw.img /repo/r-raw
    bkimg cbt detach /dev/vda >/dev/null
}

t_multi_device() {
    # One writer alternates between two disks: both images must show the same instant.
    dd if=/dev/zero of=/dev/vda bs=1M count=1 conv=fsync 2>/dev/null
    dd if=/dev/zero of=/dev/vdb bs=1M count=1 conv=fsync 2>/dev/null
    rm -f /tmp/stop
    writer /dev/vda 128 0 /dev/vdb &
    wpid=$!
    sleep 3
    id=$(bkimg snapshot create /dev/vda /dev/vdb --store /repo/m.store --store-size 32M) \
        || { touch /tmp/stop; wait $wpid; die "create"; return 1; }
    sleep 2
    touch /tmp/stop
    wait $wpid
    seqs /dev/bksnap$id-0 128 0 >/tmp/s0
    seqs /dev/bksnap$id-1 128 0 >/tmp/s1
    bkimg snapshot destroy "$id" --store /repo/m.store >/dev/null
    log "snapshot at seq $(cat /tmp/s0 /tmp/s1 | sort -n | tail -1)"
    consistent 2 128 /tmp/s0 /tmp/s1 || die "the two images are not at one instant" || return 1
    bkimg cbt detach /dev/vda >/dev/null
    bkimg cbt detach /dev/vdb >/dev/null
}

t_consistency_ext4() {
    # Files written and rewritten on a mounted ext4 while it is captured live: the restored
    # filesystem is clean and every file is whole (all of one version).
    mkfs.ext4 -q -F /dev/vdb >/dev/null
    mkdir -p /mnt/fs
    mount -t ext4 /dev/vdb /mnt/fs || die "mount" || return 1
    rm -f /tmp/stop
    ( i=0; while [ ! -e /tmp/stop ]; do
        f=/mnt/fs/f$((i % 40))
        yes "bksnap pattern v$i" | head -c 65536 >"$f.tmp" && mv "$f.tmp" "$f"
        i=$((i + 1))
      done ) &
    wpid=$!
    sleep 4
    bkimg capture --repo /repo/r-ext4 --live --store /repo/e.store --store-size 64M --json /dev/vdb >/tmp/c.json \
        || { touch /tmp/stop; wait $wpid; umount /mnt/fs; die "live capture"; return 1; }
    touch /tmp/stop
    wait $wpid
    umount /mnt/fs
    rm -f /repo/ext4.img
    bkimg restore --repo /repo/r-ext4 latest --target /repo/ext4.img --json >/dev/null || die "restore" || return 1
    e2fsck -fn /repo/ext4.img >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; die "fsck of the restored image"; return 1; }
    mkdir -p /mnt/r
    mount -t ext4 -o ro,loop /repo/ext4.img /mnt/r || die "mount restored" || return 1
    bad=0
    for f in /mnt/r/f*; do
        case "$f" in *.tmp) continue ;; esac
        v=$(head -c 40 "$f" | head -1 | sed 's/^bksnap pattern //')
        [ "$(sha256sum <"$f")" = "$(yes "bksnap pattern $v" | head -c 65536 | sha256sum)" ] || { log "$f is not whole ($v)"; bad=1; }
    done
    log "$(ls /mnt/r | grep -c '^f[0-9]*$') files, all whole: $([ $bad = 0 ] && echo yes || echo no)"
    umount /mnt/r
    rm -rf /repo/ext4.img /repo/r-ext4
    bkimg cbt detach /dev/vdb >/dev/null
    [ $bad = 0 ]
}

t_consistency_xfs() {
    # The same on XFS: the snapshot is taken under freeze, whose log holds only superblock
    # updates, so the capture reads the used blocks only (not the whole device); the
    # restored filesystem mounts (replaying those updates), checks clean, every file whole.
    mkfs.xfs -q -f /dev/vdc >/dev/null || die "mkfs.xfs" || return 1
    mkdir -p /mnt/fs
    mount -t xfs /dev/vdc /mnt/fs || die "mount" || return 1
    rm -f /tmp/stop
    ( i=0; while [ ! -e /tmp/stop ]; do
        f=/mnt/fs/f$((i % 40))
        yes "bksnap pattern v$i" | head -c 65536 >"$f.tmp" && mv "$f.tmp" "$f"
        i=$((i + 1))
      done ) &
    wpid=$!
    sleep 4
    bkimg capture --repo /repo/r-xfs --live --store /repo/x.store --store-size 64M --json /dev/vdc >/tmp/c.json \
        || { touch /tmp/stop; wait $wpid; umount /mnt/fs; die "live capture"; return 1; }
    touch /tmp/stop
    wait $wpid
    umount /mnt/fs
    read_bytes=$(jget bytes_read </tmp/c.json)
    size=$(($(cat /sys/class/block/vdc/size) * 512))
    rm -f /repo/xfs.img
    bkimg restore --repo /repo/r-xfs latest --target /repo/xfs.img --json >/dev/null || die "restore" || return 1
    mkdir -p /mnt/r
    mount -t xfs -o loop /repo/xfs.img /mnt/r || die "mount restored" || return 1
    bad=0
    for f in /mnt/r/f*; do
        case "$f" in *.tmp) continue ;; esac
        v=$(head -c 40 "$f" | head -1 | sed 's/^bksnap pattern //')
        [ "$(sha256sum <"$f")" = "$(yes "bksnap pattern $v" | head -c 65536 | sha256sum)" ] || { log "$f is not whole ($v)"; bad=1; }
    done
    log "read $read_bytes of $size bytes; $(ls /mnt/r | grep -c '^f[0-9]*$') files, all whole: $([ $bad = 0 ] && echo yes || echo no)"
    umount /mnt/r
    xfs_repair -n -f /repo/xfs.img >/tmp/repair.log 2>&1 || { cat /tmp/repair.log; die "xfs_repair of the restored image"; return 1; }
    rm -rf /repo/xfs.img /repo/r-xfs
    bkimg cbt detach /dev/vdc >/dev/null
    [ "$read_bytes" -lt $((size / 2)) ] || die "the frozen XFS was read whole ($read_bytes bytes), not by its used blocks" || return 1
    [ $bad = 0 ]
}

t_cbt_incremental() {
    # A CBT incremental restores to the same bytes as a hash-diff incremental of the same
    # snapshot (raw captures: every byte compared), and reads only the chunks that changed;
    # filesystem-aware, both restore the same files (free space may differ: a block freed
    # since the parent is not rewritten, so CBT keeps the parent's stale bytes there where
    # hash-diff stores a hole).
    mkfs.ext4 -q -F /dev/vdb >/dev/null
    mount -t ext4 /dev/vdb /mnt/fs || return 1
    local n=0
    while [ $n -lt 20 ]; do pattern "base$n" 1 >/mnt/fs/b$n; n=$((n + 1)); done
    sync
    for mode in raw fs; do
        flag=""
        [ $mode = raw ] && flag=--raw
        rm -rf /repo/r-inc
        bkimg capture --repo /repo/r-inc --live $flag --store /repo/i.store --store-size 32M --json /dev/vdb >/tmp/full.json \
            || die "full live capture" || return 1
        parent=$(jget id </tmp/full.json)
        pattern "changed$mode" 2 >/mnt/fs/b3
        pattern "added$mode" 1 >/mnt/fs/new$mode
        rm -f /mnt/fs/b7
        sync
        id=$(bkimg snapshot create /dev/vdb --store /repo/i.store --store-size 32M) || return 1
        img=/dev/bksnap$id-0
        seq=$(bkimg snapshot info "$id" --json | jget sequence)
        from=$(bkimg info --repo /repo/r-inc "$parent" --json | jget sequence)
        bkimg cbt map /dev/vdb --from "$from" --to "$seq" -o /repo/inc.map --json >/tmp/map.json || return 1
        bkimg capture --repo /repo/r-inc $flag --parent "$parent" --changed-blocks /repo/inc.map --json "$img" >/tmp/cbt.json \
            || die "cbt incremental" || return 1
        bkimg capture --repo /repo/r-inc $flag --parent "$parent" --json "$img" >/tmp/hd.json || die "hash-diff incremental" || return 1
        bkimg snapshot destroy "$id" --store /repo/i.store >/dev/null
        grep -q '"changed-blocks"' /tmp/cbt.json || die "not a changed-blocks capture: $(cat /tmp/cbt.json)" || return 1
        rd_cbt=$(jget bytes_read </tmp/cbt.json)
        rd_hd=$(jget bytes_read </tmp/hd.json)
        log "$mode: map $(jget bytes_changed </tmp/map.json) bytes; read: changed-blocks $rd_cbt, hash-diff $rd_hd"
        [ "$rd_cbt" -lt $((rd_hd / 4)) ] || die "changed-blocks read too much" || return 1
        rm -f /repo/cbt.img /repo/hd.img
        bkimg restore --repo /repo/r-inc "$(jget id </tmp/cbt.json)" --target /repo/cbt.img >/dev/null 2>&1 || return 1
        bkimg restore --repo /repo/r-inc "$(jget id </tmp/hd.json)" --target /repo/hd.img >/dev/null 2>&1 || return 1
        e2fsck -fn /repo/cbt.img >/dev/null 2>&1 || die "fsck ($mode)" || return 1
        if [ $mode = raw ]; then
            cmp -s /repo/cbt.img /repo/hd.img || die "raw: the two incrementals restore differently" || return 1
        else
            mount -t ext4 -o ro,loop /repo/cbt.img /mnt/r || return 1
            mkdir -p /mnt/r2
            mount -t ext4 -o ro,loop /repo/hd.img /mnt/r2 || { umount /mnt/r; return 1; }
            same=yes
            for f in /mnt/fs/* /mnt/r/* /mnt/r2/*; do
                b=$(basename "$f")
                [ "$b" = lost+found ] && continue
                { cmp -s "/mnt/fs/$b" "/mnt/r/$b" && cmp -s "/mnt/fs/$b" "/mnt/r2/$b"; } || { log "$b differs"; same=no; }
            done
            umount /mnt/r2
            umount /mnt/r
            [ $same = yes ] || die "fs: the restored files differ" || return 1
        fi
    done
    umount /mnt/fs
    rm -rf /repo/r-inc /repo/*.img /repo/inc.map
    bkimg cbt detach /dev/vdb >/dev/null
}

t_overflow() {
    # A tiny store: the snapshot fails cleanly, the event is reported, the device holds
    # exactly what was written.
    pattern o 24 | dd of=/dev/vdb bs=1M conv=fsync 2>/dev/null
    id=$(bkimg snapshot create /dev/vdb --store /repo/o.store --store-size 4M) || die "create" || return 1
    bkimg snapshot watch "$id" --store /repo/o.store --grow-by 1M --max-store 4M --json >/tmp/w.json 2>/tmp/w.err &
    wpid=$!
    pattern p 24 | dd of=/dev/vdb bs=1M conv=fsync 2>/dev/null
    wait $wpid
    wrc=$?
    state=$(bkimg snapshot info "$id" --json | jget state)
    dd if=/dev/bksnap$id-0 bs=1M count=1 of=/dev/null 2>/dev/null && { die "a failed image must not read"; return 1; }
    bkimg snapshot destroy "$id" --store /repo/o.store >/dev/null
    [ "$state" = failed ] || die "state $state" || return 1
    [ $wrc != 0 ] && grep -q failed /tmp/w.json || die "watch did not see the failure: $(cat /tmp/w.json /tmp/w.err)" || return 1
    [ "$(dd if=/dev/vdb bs=1M count=24 2>/dev/null | sha256sum)" = "$(pattern p 24 | sha256sum)" ] \
        || die "the device does not hold what was written" || return 1
    bkimg cbt detach /dev/vdb >/dev/null
}

t_store_growth() {
    # The store grows while a long write runs; the snapshot survives.
    pattern g 48 | dd of=/dev/vdb bs=1M conv=fsync 2>/dev/null
    id=$(bkimg snapshot create /dev/vdb --store /repo/g.store --store-size 8M) || die "create" || return 1
    bkimg snapshot watch "$id" --store /repo/g.store --grow-by 8M --max-store 96M --json >/tmp/w.json 2>/tmp/w.err &
    wpid=$!
    i=0
    while [ $i -lt 6 ]; do
        pattern h 8 | dd of=/dev/vdb bs=1M seek=$((i * 8)) conv=fsync 2>/dev/null
        i=$((i + 1))
    done
    state=$(bkimg snapshot info "$id" --json | jget state)
    img=$(dd if=/dev/bksnap$id-0 bs=1M count=48 2>/dev/null | sha256sum)
    bkimg snapshot destroy "$id" --store /repo/g.store >/dev/null
    wait $wpid
    log "watch: $(tr -d '\n' </tmp/w.json)"
    [ "$state" = active ] || die "state $state: $(cat /tmp/w.err)" || return 1
    [ "$img" = "$(pattern g 48 | sha256sum)" ] || die "image differs" || return 1
    bkimg cbt detach /dev/vdb >/dev/null
}

t_save_reload() {
    bkimg cbt attach /dev/vdb --json >/dev/null || return 1
    id=$(bkimg snapshot create /dev/vdb --store /repo/s.store --store-size 16M) || return 1
    bkimg snapshot destroy "$id" --store /repo/s.store >/dev/null
    pattern s 1 | dd of=/dev/vdb bs=1M seek=20 conv=fsync 2>/dev/null
    gen=$(bkimg cbt status /dev/vdb --json | jget generation)
    bkimg cbt detach /dev/vdb --save /repo/vdb.cbt >/dev/null || die "detach --save" || return 1
    rmmod bksnap || die "rmmod" || return 1
    insmod /root/bksnap.ko || die "insmod" || return 1
    bkimg cbt restore /dev/vdb /repo/vdb.cbt --json >/tmp/r.json || die "restore" || return 1
    [ "$(jget generation </tmp/r.json)" = "$gen" ] || die "generation changed" || return 1
    pattern t 1 | dd of=/dev/vdb bs=1M seek=40 conv=fsync 2>/dev/null
    id=$(bkimg snapshot create /dev/vdb --store /repo/s.store --store-size 16M) || return 1
    bkimg snapshot destroy "$id" --store /repo/s.store >/dev/null
    bkimg cbt map /dev/vdb --from 1 -o /tmp/m.map --json >/tmp/m.json || return 1
    [ "$(jget bytes_changed </tmp/m.json)" = 2097152 ] || die "map across the reload: $(cat /tmp/m.json)" || return 1
    # A crash (no saved state): the next attach is another generation, and a live capture
    # whose parent has the old one falls back to hash-diff.
    bkimg capture --repo /repo/r-gen --live --store /repo/l.store --store-size 16M --json /dev/vdb >/dev/null || return 1
    bkimg cbt detach /dev/vdb >/dev/null
    bkimg cbt attach /dev/vdb >/dev/null
    [ "$(bkimg cbt status /dev/vdb --json | jget generation)" != "$gen" ] || die "same generation after a crash" || return 1
    bkimg capture --repo /repo/r-gen --live --parent latest --store /repo/l.store --store-size 16M --json /dev/vdb >/tmp/c.json 2>/tmp/c.err \
        || die "live incremental" || return 1
    grep -q '"fallback"' /tmp/c.json || die "no fallback reported: $(cat /tmp/c.json)" || return 1
    grep -q '"hash-diff"' /tmp/c.json || die "not hash-diff" || return 1
    rm -rf /repo/r-gen
    bkimg cbt detach /dev/vdb >/dev/null
}

# packaging/cbt-state, which the Debian package's units run at shutdown (save) and boot
# (restore), with the module. No udev here: the persistent link is made by hand.
t_cbt_state() {
    export BKIMG_CBT_DIR=/repo/cbt-state
    mkdir -p /dev/disk/by-id
    ln -sf ../../vdb /dev/disk/by-id/virtio-vm-vdb
    bkimg cbt attach /dev/vdb >/dev/null || return 1
    bkimg cbt attach /dev/vdc >/dev/null || return 1
    gen=$(bkimg cbt status /dev/vdb --json | jget generation)
    mkfs.ext4 -q -F /dev/vdb >/dev/null && mount -t ext4 /dev/vdb /mnt/fs || return 1
    # A filesystem still read-write on vdb, no persistent name for vdc: neither is saved,
    # both stay tracked.
    sh /root/cbt-state save 2>/tmp/s.err
    cat /tmp/s.err
    grep -q "/dev/vdb not saved, it still has writers: /dev/vdb mounted read-write on /mnt/fs" /tmp/s.err ||
        die "vdb saved with a read-write filesystem" || return 1
    grep -q "/dev/vdc not saved: no link to it" /tmp/s.err || die "vdc without a persistent name" || return 1
    bkimg cbt status /dev/vdb >/dev/null && bkimg cbt status /dev/vdc >/dev/null || die "detached" || return 1
    [ -z "$(ls -A $BKIMG_CBT_DIR/by-id 2>/dev/null)" ] || die "a state was written" || return 1
    # Read-only: saved (and a state left from an earlier boot removed).
    mount -o remount,ro /mnt/fs || return 1
    mkdir -p $BKIMG_CBT_DIR/by-id && echo stale >$BKIMG_CBT_DIR/by-id/stale.cbt
    sh /root/cbt-state save || die "save failed" || return 1
    [ -f $BKIMG_CBT_DIR/by-id/virtio-vm-vdb.cbt ] || die "no state for vdb" || return 1
    [ ! -e $BKIMG_CBT_DIR/by-id/stale.cbt ] || die "the stale state was kept" || return 1
    bkimg cbt status /dev/vdb >/dev/null 2>&1 && { die "vdb still tracked after the save"; return 1; }
    umount /mnt/fs
    # The reboot: the module reloaded; a state for a disk that is gone is discarded.
    bkimg cbt detach /dev/vdc >/dev/null
    rmmod bksnap && insmod /root/bksnap.ko || die "reload" || return 1
    echo gone >$BKIMG_CBT_DIR/by-id/virtio-gone.cbt
    sh /root/cbt-state restore 2>/tmp/r.err || { cat /tmp/r.err; die "restore failed"; return 1; }
    cat /tmp/r.err
    grep -q "virtio-gone: saved tracking discarded, no such device" /tmp/r.err || die "gone not discarded" || return 1
    [ "$(bkimg cbt status /dev/vdb --json | jget generation)" = "$gen" ] || die "not resumed at generation $gen" || return 1
    [ -z "$(ls -A $BKIMG_CBT_DIR)" ] || die "states left: $(ls -R $BKIMG_CBT_DIR)" || return 1
    rm -rf $BKIMG_CBT_DIR /dev/disk
    unset BKIMG_CBT_DIR
    bkimg cbt detach /dev/vdb >/dev/null
}

t_unload_busy() {
    bkimg cbt attach /dev/vdb >/dev/null || return 1
    rmmod bksnap 2>/dev/null && { die "rmmod with a tracker attached must be refused"; return 1; }
    id=$(bkimg snapshot create /dev/vdb --store /repo/u.store --store-size 16M) || return 1
    rmmod bksnap 2>/dev/null && { die "rmmod with a snapshot must be refused"; return 1; }
    bkimg cbt detach /dev/vdb 2>/dev/null && { die "detach under a snapshot must be refused"; return 1; }
    bkimg snapshot destroy "$id" --store /repo/u.store >/dev/null
    bkimg cbt detach /dev/vdb >/dev/null
    rmmod bksnap || die "rmmod after everything detached" || return 1
    insmod /root/bksnap.ko
}

t_stacked_loop() {
    # A loop device over a file on a tracked ext4: both tracked and held by one snapshot;
    # writes to the loop device reach the filesystem from the loop driver's worker.
    mkfs.ext4 -q -F /dev/vdb >/dev/null
    mount -t ext4 /dev/vdb /mnt/fs || return 1
    dd if=/dev/zero of=/mnt/fs/disk.img bs=1M count=32 2>/dev/null
    losetup /dev/loop0 /mnt/fs/disk.img || { umount /mnt/fs; die "losetup"; return 1; }
    pattern l 16 | dd of=/dev/loop0 bs=1M conv=fsync 2>/dev/null
    id=$(bkimg snapshot create /dev/vdb /dev/loop0 --store /repo/l.store --store-size 64M) \
        || { losetup -d /dev/loop0; umount /mnt/fs; die "create"; return 1; }
    pattern m 16 | dd of=/dev/loop0 bs=1M conv=fsync 2>/dev/null
    sync
    a=$(dd if=/dev/bksnap$id-1 bs=1M count=16 2>/dev/null | sha256sum)
    bkimg snapshot destroy "$id" --store /repo/l.store >/dev/null
    losetup -d /dev/loop0
    # The loop device lets go of its file asynchronously after the detach.
    tries=0
    until umount /mnt/fs 2>/dev/null || [ $tries -ge 30 ]; do sleep 1; tries=$((tries + 1)); done
    [ "$a" = "$(pattern l 16 | sha256sum)" ] || die "loop image changed" || return 1
    bkimg cbt detach /dev/loop0 >/dev/null
    bkimg cbt detach /dev/vdb >/dev/null
}

t_nested_dm() {
    # device-mapper (a linear map over /dev/vdb) submits its clone of each write from
    # inside its own submit path (current->bio_list set): there a copy-on-write read would
    # wait on a bio that cannot start until the caller returns. The hook must hand those
    # writes to its worker: the snapshot stays active and its image keeps the old data.
    pattern n 8 | dd of=/dev/vdb bs=1M conv=fsync 2>/dev/null
    size=$(blockdev --getsz /dev/vdb)
    export DM_DISABLE_UDEV=1
    dmsetup create bkt --table "0 $size linear /dev/vdb 0" || die "dmsetup create" || return 1
    [ -b /dev/mapper/bkt ] || dmsetup mknodes bkt
    id=$(bkimg snapshot create /dev/vdb --store /repo/n.store --store-size 64M) \
        || { dmsetup remove bkt; die "create"; return 1; }
    pattern o 8 | dd of=/dev/mapper/bkt bs=1M oflag=direct 2>/dev/null
    pattern p 4 | dd of=/dev/mapper/bkt bs=64k conv=fsync 2>/dev/null
    info=$(bkimg snapshot info "$id" --json)
    a=$(dd if=/dev/bksnap$id-0 bs=1M count=8 2>/dev/null | sha256sum)
    bkimg snapshot destroy "$id" --store /repo/n.store >/dev/null
    b=$(dd if=/dev/vdb bs=1M count=4 iflag=direct 2>/dev/null | sha256sum)
    dmsetup remove bkt
    bkimg cbt detach /dev/vdb >/dev/null
    log "snapshot $(echo "$info" | jget state), $(echo "$info" | jget copied_chunks) chunks copied"
    [ "$(echo "$info" | jget state)" = active ] || die "the snapshot failed: $(echo "$info" | jget error)" || return 1
    [ "$a" = "$(pattern n 8 | sha256sum)" ] || die "the image changed under writes through dm" || return 1
    [ "$b" = "$(pattern p 4 | sha256sum)" ] || die "the device does not hold what was written through dm"
}

t_store_hang() {
    # A store whose writes hang (its device is a loop device over a file on a frozen
    # filesystem): the write to the original device does not wait for the store (old data
    # is held in memory while its store write is in flight) and holds its data; after the
    # module's 30 s limit the snapshot fails and its image refuses reads.
    mkfs.ext4 -q -F /dev/vdc >/dev/null
    mkdir -p /mnt/st /mnt/st2
    mount -t ext4 /dev/vdc /mnt/st || return 1
    dd if=/dev/zero of=/mnt/st/backing bs=1M count=96 2>/dev/null
    losetup /dev/loop1 /mnt/st/backing || return 1
    # Inode tables and journal zeroed now, not by ext4lazyinit later: its zeroing reaches the
    # loop device as fallocate, which the loop driver passes to the frozen filesystem below
    # without the freeze protection a write gets (a kernel WARNING, panic_on_warn here).
    mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0,nodiscard /dev/loop1 >/dev/null
    mount -t ext4 -o noinit_itable /dev/loop1 /mnt/st2 || return 1
    pattern q 4 | dd of=/dev/vdb bs=1M conv=fsync 2>/dev/null
    id=$(bkimg snapshot create /dev/vdb --store /mnt/st2/h.store --store-size 32M) || die "create" || return 1
    sync
    fsfreeze --freeze /mnt/st || die "fsfreeze" || return 1
    start=$(cut -d. -f1 /proc/uptime)
    pattern r 4 | dd of=/dev/vdb bs=1M conv=fsync 2>/dev/null
    took=$(($(cut -d. -f1 /proc/uptime) - start))
    # The write must not have waited for the store: when it completed, the snapshot was
    # still active (it fails only once the store write has hung for the module's limit).
    state_after_write=$(bkimg snapshot info "$id" --json | jget state)
    waited=0
    while info=$(bkimg snapshot info "$id" --json) && [ "$(echo "$info" | jget state)" != failed ] \
        && [ $waited -lt 60 ]; do
        sleep 1; waited=$((waited + 1))
    done
    image_refused=yes
    dd if=/dev/bksnap$id-0 of=/dev/null bs=1M count=4 iflag=direct 2>/dev/null && image_refused=no
    fsfreeze --unfreeze /mnt/st
    bkimg snapshot destroy "$id" --store /mnt/st2/h.store >/dev/null
    umount /mnt/st2
    losetup -d /dev/loop1
    umount /mnt/st
    log "the write took $took s (snapshot then $state_after_write); snapshot $(echo "$info" | jget state) after $waited s more: $(echo "$info" | jget error)"
    [ "$state_after_write" = active ] || die "the write waited for the hanging store" || return 1
    [ "$(echo "$info" | jget state)" = failed ] || die "the snapshot did not fail" || return 1
    [ "$image_refused" = yes ] || die "the failed snapshot's image served a read" || return 1
    [ "$(dd if=/dev/vdb bs=1M count=4 2>/dev/null | sha256sum)" = "$(pattern r 4 | sha256sum)" ] \
        || die "the device does not hold what was written"
}

t_continuous() {
    # `replicate --continuous` with bksnap loaded, while a writer keeps writing the source,
    # shipping to a standby on 127.0.0.1 that keeps a replica: every capture after the first
    # is live and reads only what changed-block tracking names; cycles keep to the interval;
    # while the standby is not running yet the ships fail and the captures go on, and the
    # first ship after it starts carries every point taken meanwhile; the lag is reported
    # per cycle; after the writer stops, one more cycle's point restores from the standby to
    # exactly the device, and the replica equals the device.
    pattern cont 128 | dd of=/dev/vdb bs=1M conv=fsync 2>/dev/null
    rm -rf /repo/r-cont /repo/sb /repo/sb.img /repo/k-src /repo/k-sb /repo/cont.img /tmp/stop
    ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up || die "no loopback" || return 1
    fps=$(bkimg standby keygen --dir /repo/k-src) || die "keygen" || return 1
    fp=$(bkimg standby keygen --dir /repo/k-sb) || die "keygen" || return 1
    cont() { # CYCLES -> stderr lines of the service, each after the uptime it came at
        bkimg replicate --continuous --every 2s --cycles "$1" --json --repo /repo/r-cont \
            --to bkimg://127.0.0.1:7070 --key /repo/k-src --server-fingerprint "$fp" \
            --retries 0 --store /repo/cont.store --store-size 32M /dev/vdb 2>&1 >>/tmp/cycles.json \
            | while read -r line; do echo "$(cut -d' ' -f1 /proc/uptime) $line"; done
    }
    : >/tmp/cycles.json
    writer /dev/vdb 256 4096 &
    wpid=$!
    sleep 2
    cont 2 >/tmp/cont.log
    bkimg standby serve --listen 127.0.0.1:7070 --repo /repo/sb --key /repo/k-sb \
        --allow "$fps" --replica /repo/sb.img >/tmp/sb.log 2>&1 &
    sbpid=$!
    # Started means listening: under emulation on a busy host that takes seconds, and a ship
    # that came first would be refused like those before the start.
    waited=0
    until grep -q 'listening on' /tmp/sb.log; do
        kill -0 $sbpid 2>/dev/null || { cat /tmp/sb.log; die "the standby ended"; return 1; }
        [ $waited -lt 120 ] || { cat /tmp/sb.log; die "the standby is not listening after 120 s"; return 1; }
        sleep 1; waited=$((waited + 1))
    done
    cont 4 >>/tmp/cont.log
    touch /tmp/stop
    wait $wpid
    cont 1 >>/tmp/cont.log
    grep 'captured\|unreachable\|stopped\|error' /tmp/cont.log | sed 's/^/    /'
    sed 's/^/    cycle: /' /tmp/cycles.json
    [ "$(grep -c ': captured ' /tmp/cont.log)" = 7 ] || die "7 cycles should have captured 7 points" || return 1
    grep -q 'target unreachable' /tmp/cont.log || die "ships before the standby started should have failed" || return 1
    [ "$(wc -l </tmp/cycles.json)" = 5 ] || die "the 5 cycles after the standby started should have shipped" || return 1
    head -1 /tmp/cycles.json | grep -q '"points_sent":\["[^"]*","[^"]*","[^"]*"\]' \
        || die "the first ship should carry the 3 points taken so far" || return 1
    # Every ship reports the lag (its figures are for the log: emulation on a busy host
    # sets them, bench/replicate-continuous measures them).
    [ "$(grep -c '"lag_seconds":[0-9]' /tmp/cycles.json)" = 5 ] || die "a ship without its lag" || return 1
    grep ': captured ' /tmp/cont.log | head -1 | grep -q '(live, full, ' \
        || die "the first capture is not a live full one" || return 1
    bad=0 prev=""
    grep ': captured ' /tmp/cont.log | tail -n +2 >/tmp/incs
    while read -r at line; do
        case "$line" in
            *"(live, changed-blocks, "*" B read)"* | *"(live, changed-blocks, "*" KiB read)"*) ;;
            *"(live, changed-blocks, "*" MiB read)"*)
                mib=$(echo "$line" | sed -n 's/.*changed-blocks, \([0-9]*\)\.[0-9]* MiB read.*/\1/p')
                [ "$mib" -lt 16 ] || { log "read too much: $line"; bad=1; } ;;
            *) log "not a live changed-blocks capture: $line"; bad=1 ;;
        esac
    done </tmp/incs
    [ $bad = 0 ] || die "incremental cycles did not use changed-block tracking" || return 1
    # The time between captures: the interval, plus a capture and ship when they took longer.
    grep ': captured ' /tmp/cont.log | sed -n '3,6p' | cut -d' ' -f1 | cut -d. -f1 >/tmp/at
    gaps=$(awk 'NR > 1 { printf "%s%d", sep, $1 - prev; sep = " " } { prev = $1 }' /tmp/at)
    log "seconds between captures: $gaps"
    newest=$(sed -n 's/.*"newest_on_target":"\([^"]*\)".*/\1/p' /tmp/cycles.json | tail -1)
    [ -n "$newest" ] || die "no newest point reported" || return 1
    for r in /repo/r-cont /repo/sb; do
        bkimg verify --repo $r >/tmp/v.log 2>&1 || { cat /tmp/v.log; die "verify $r"; return 1; }
    done
    bkimg restore --repo /repo/sb "$newest" --target /repo/cont.img >/dev/null 2>&1 || die "restore" || return 1
    cmp /repo/cont.img /dev/vdb || die "the newest point on the standby differs from the device" || return 1
    i=0
    until bkimg standby status --repo /repo/sb --json 2>/dev/null | grep -q "\"applied\": *\"$newest\""; do
        i=$((i + 1))
        [ $i -lt 120 ] || { cat /tmp/sb.log; die "the replica never reached $newest"; return 1; }
        sleep 1
    done
    cmp /repo/sb.img /dev/vdb || die "the replica differs from the device" || return 1
    kill $sbpid 2>/dev/null
    wait $sbpid 2>/dev/null
    [ ! -e /repo/cont.store ] || die "the store file was left behind" || return 1
    rm -rf /repo/r-cont /repo/sb /repo/sb.img /repo/k-src /repo/k-sb /repo/cont.img
    bkimg cbt detach /dev/vdb >/dev/null
}

t_unload_reload() {
    rmmod bksnap || die "rmmod with nothing attached failed" || return 1
    insmod /root/bksnap.ko || die "insmod again failed" || return 1
    [ -c /dev/bksnap ] || die "/dev/bksnap missing after reload"
}

t_immutable_store() {
    # While a snapshot lives its store file cannot be removed or truncated, even by root
    # (the kernel writes into its blocks); destroy --store removes it.
    id=$(bkimg snapshot create /dev/vdb --store /repo/i.store --store-size 16M) || die "create" || return 1
    lsattr /repo/i.store | grep -q '^[^ ]*i' || die "the store is not immutable: $(lsattr /repo/i.store)" || return 1
    rm -f /repo/i.store 2>/dev/null
    [ -f /repo/i.store ] || die "root removed the store of a live snapshot" || return 1
    truncate -s 0 /repo/i.store 2>/dev/null
    [ "$(stat -c %s /repo/i.store)" = 16777216 ] || die "the store was truncated" || return 1
    bkimg snapshot destroy "$id" --store /repo/i.store >/dev/null || die "destroy" || return 1
    [ ! -e /repo/i.store ] || die "destroy --store left the store" || return 1
    # A store left behind by a snapshot already gone (destroyed without --store, or a
    # reboot) is removed by destroy --store, unless another snapshot is live.
    id=$(bkimg snapshot create /dev/vdb --store /repo/j.store --store-size 16M) || die "create j" || return 1
    bkimg snapshot destroy "$id" >/dev/null || die "destroy j" || return 1
    other=$(bkimg snapshot create /dev/vdc --store /repo/k.store --store-size 16M) || die "create k" || return 1
    bkimg snapshot destroy "$id" --store /repo/j.store >/dev/null 2>/tmp/j.err && { die "removed with a snapshot live"; return 1; }
    [ -f /repo/j.store ] || die "the store went while a snapshot was live" || return 1
    log "refused: $(cat /tmp/j.err)"
    bkimg snapshot destroy "$other" --store /repo/k.store >/dev/null || die "destroy k" || return 1
    bkimg snapshot destroy "$id" --store /repo/j.store >/dev/null 2>/tmp/j.err || die "destroy --store of a gone snapshot: $(cat /tmp/j.err)" || return 1
    [ ! -e /repo/j.store ] || die "the left-behind store is still there"
}

t_create_undo() {
    # A create that fails detaches the trackers it attached for it: vdb was not tracked,
    # vdc is held by another snapshot, so the second create fails and vdb stays untracked.
    id=$(bkimg snapshot create /dev/vdc --store /repo/u1.store --store-size 16M) || die "create" || return 1
    if bkimg snapshot create /dev/vdb /dev/vdc --store /repo/u2.store --store-size 16M >/dev/null 2>&1; then
        die "a snapshot of a device already in one was taken"; return 1
    fi
    tracked=no
    bkimg cbt status /dev/vdb >/dev/null 2>&1 && tracked=yes
    bkimg snapshot destroy "$id" --store /repo/u1.store >/dev/null
    [ "$tracked" = no ] || die "the failed create left /dev/vdb tracked"
}

t_partition_overlap() {
    # A partition lies inside its whole disk: one snapshot of both is refused (each would
    # copy the other's writes into the store), each alone is taken.
    dd if=/dev/zero of=/dev/vde bs=1M count=1 conv=fsync 2>/dev/null
    # An MBR with one Linux partition from sector 2048, 65536 sectors long.
    printf '\000\000\000\000\203\000\000\000\000\010\000\000\000\000\001\000' |
        dd of=/dev/vde bs=1 seek=446 conv=notrunc 2>/dev/null
    printf '\125\252' | dd of=/dev/vde bs=1 seek=510 conv=notrunc,fsync 2>/dev/null
    blockdev --rereadpt /dev/vde
    [ -b /dev/vde1 ] || die "no /dev/vde1" || return 1
    ok=yes
    bkimg snapshot create /dev/vde /dev/vde1 --store /repo/p.store --store-size 16M >/dev/null 2>/tmp/p.err && ok=no
    tracked=no
    bkimg cbt status /dev/vde1 >/dev/null 2>&1 && tracked=yes
    id=$(bkimg snapshot create /dev/vde1 --store /repo/p1.store --store-size 16M) || die "create of the partition" || return 1
    bkimg snapshot destroy "$id" --store /repo/p1.store >/dev/null
    bkimg cbt detach /dev/vde1 >/dev/null 2>&1
    bkimg cbt detach /dev/vde >/dev/null 2>&1
    dd if=/dev/zero of=/dev/vde bs=1M count=1 conv=fsync 2>/dev/null
    blockdev --rereadpt /dev/vde
    [ "$ok" = yes ] || die "a snapshot of a disk and its partition was taken" || return 1
    log "refused: $(cat /tmp/p.err)"
    grep -q 'partition and its whole disk' /tmp/p.err || die "the message does not say why" || return 1
    [ "$tracked" = no ] || die "the refused create left /dev/vde1 tracked"
}

# Every control path at once, for STRESS seconds (the file /root/stress_seconds; 60 by
# default, 600 for the long run), under writers: multi-device snapshots created, their
# images read and checked, destroyed; a third device's tracker attached, marked, mapped and
# detached while snapshots of it are created; status queries; rmmod attempts. Commands may
# fail (EBUSY, EEXIST, ENOENT: that is the race); what must hold: every snapshot taken is
# at one instant, the kernel reports nothing (lockdep, KASAN and warnings are on), and
# everything is released at the end.
t_stress() {
    secs=$(cat /root/stress_seconds 2>/dev/null || echo 60)
    for d in vda vdb vdc; do dd if=/dev/zero of=/dev/$d bs=1M count=1 conv=fsync 2>/dev/null; done
    rm -f /tmp/stop /tmp/stress.*
    end=$(($(cut -d. -f1 /proc/uptime) + secs))
    running() { [ "$(cut -d. -f1 /proc/uptime)" -lt $end ]; }
    writer /dev/vda 32 0 /dev/vdb &
    w1=$!
    writer /dev/vdc 32 0 &
    w2=$!
    (
        n=0 ok=0
        while running; do
            n=$((n + 1))
            id=$(bkimg snapshot create /dev/vda /dev/vdb --store /repo/s$n.store --store-size 32M 2>/dev/null) || continue
            seqs /dev/bksnap$id-0 32 0 >/tmp/stress.a
            seqs /dev/bksnap$id-1 32 0 >/tmp/stress.b
            bkimg snapshot info "$id" >/dev/null
            bkimg snapshot destroy "$id" --store /repo/s$n.store >/dev/null || echo "  destroy of $id failed"
            # Detached again, so that at times nothing is attached and rmmod goes through.
            bkimg cbt detach /dev/vda >/dev/null 2>&1
            bkimg cbt detach /dev/vdb >/dev/null 2>&1
            consistent 2 32 /tmp/stress.a /tmp/stress.b || { echo "  snapshot $id (vda+vdb) torn"; touch /tmp/stress.torn; }
            ok=$((ok + 1))
        done
        echo "$ok" >/tmp/stress.multi
    ) &
    p1=$!
    (
        n=0 ok=0
        while running; do
            n=$((n + 1))
            id=$(bkimg snapshot create /dev/vdc --store /repo/c$n.store --store-size 16M --no-freeze 2>/dev/null) || continue
            seqs /dev/bksnap$id-0 32 0 >/tmp/stress.c
            bkimg snapshot destroy "$id" --store /repo/c$n.store >/dev/null || echo "  destroy of $id failed"
            bkimg cbt detach /dev/vdc >/dev/null 2>&1
            consistent 1 32 /tmp/stress.c || { echo "  snapshot $id (vdc) torn"; touch /tmp/stress.torn; }
            ok=$((ok + 1))
        done
        echo "$ok" >/tmp/stress.single
    ) &
    p2=$!
    (
        n=0
        while running; do
            bkimg cbt attach /dev/vdc >/dev/null 2>&1
            bkimg cbt mark /dev/vdc --range 0:8 --range 4096:64 >/dev/null 2>&1
            bkimg cbt map /dev/vdc --from 0 -o /tmp/stress.map >/dev/null 2>&1
            bkimg cbt detach /dev/vdc >/dev/null 2>&1 && n=$((n + 1))
        done
        echo "$n" >/tmp/stress.detach
    ) &
    p3=$!
    (
        n=0
        while running; do
            bkimg cbt status >/dev/null 2>&1
            bkimg snapshot list >/dev/null 2>&1
            # Refused while anything is attached; when it goes through, the writers are
            # passing through the write hook it removes.
            if rmmod bksnap 2>/dev/null; then n=$((n + 1)); insmod /root/bksnap.ko; fi
        done
        echo "$n" >/tmp/stress.rmmod
    ) &
    p4=$!
    wait $p1 $p2 $p3 $p4
    # Then unloads under the writers: with nothing attached every write still enters the
    # hook and passes through, and rmmod must wait for those asleep in the pass-through.
    grep -q '^bksnap ' /proc/modules || insmod /root/bksnap.ko
    for d in vda vdb vdc; do bkimg cbt detach /dev/$d >/dev/null 2>&1; done
    u=0
    while [ $u -lt 20 ]; do
        rmmod bksnap || { die "rmmod with nothing attached"; touch /tmp/stop; return 1; }
        insmod /root/bksnap.ko || { die "insmod"; touch /tmp/stop; return 1; }
        u=$((u + 1))
    done
    echo $(($(cat /tmp/stress.rmmod) + u)) >/tmp/stress.rmmod
    touch /tmp/stop
    wait $w1 $w2
    log "$secs s: $(cat /tmp/stress.multi) two-device and $(cat /tmp/stress.single) one-device snapshots checked, $(cat /tmp/stress.detach) detaches, $(cat /tmp/stress.rmmod) unloads"
    grep -q '^bksnap ' /proc/modules || insmod /root/bksnap.ko
    [ ! -e /tmp/stress.torn ] || die "a snapshot was not at one instant" || return 1
    [ "$(cat /tmp/stress.multi)" -gt 0 ] && [ "$(cat /tmp/stress.single)" -gt 0 ] \
        || die "no snapshot was taken" || return 1
    [ -z "$(bkimg snapshot list --json | tr -d '[] \n')" ] || die "snapshots left: $(bkimg snapshot list)" || return 1
    for d in vda vdb vdc; do bkimg cbt detach /dev/$d >/dev/null 2>&1; done
    ls /repo/*.store >/dev/null 2>&1 && { die "stores left: $(ls /repo/*.store)"; return 1; }
    rmmod bksnap || die "rmmod once everything was released" || return 1
    insmod /root/bksnap.ko
}

t_smoke() {
    sh /root/smoke.sh /dev/vdb /repo
}

# A saved state whose device was written while untracked (the module unloaded: another
# system, a rescue medium) is refused at restore with one line naming the device and what
# differed; the next incremental is a hash-diff that restores to the disk's bytes. A state
# restored on another device with the same bytes (a loop device over a copy) is refused by
# its identity. packaging/cbt-state discards a refused state without failing.
t_cbt_state_tampered() {
    rm -rf /repo/r-tamper
    pattern base 128 | dd of=/dev/vdb bs=1M conv=fsync 2>/dev/null
    bkimg capture --repo /repo/r-tamper --live --raw --store /repo/l.store --store-size 16M --json /dev/vdb >/tmp/c.json \
        || die "full live capture" || return 1
    gen=$(bkimg cbt status /dev/vdb --json | jget generation)
    bkimg cbt detach /dev/vdb --save /repo/vdb.cbt >/dev/null || die "detach --save" || return 1
    rmmod bksnap || die "rmmod" || return 1
    # Behind the tracker's back: the partition-table MiB and one far from it.
    pattern behind 1 | dd of=/dev/vdb bs=1M seek=0 conv=fsync 2>/dev/null
    pattern behind2 1 | dd of=/dev/vdb bs=1M seek=70 conv=fsync 2>/dev/null
    insmod /root/bksnap.ko || die "insmod" || return 1
    bkimg cbt restore /dev/vdb /repo/vdb.cbt 2>/tmp/r.err
    rc=$?
    cat /tmp/r.err
    [ $rc = 7 ] || die "restore of a tampered disk: exit $rc, not 7" || return 1
    [ "$(wc -l </tmp/r.err)" = 1 ] || die "not one line" || return 1
    grep -q "saved tracker state /repo/vdb.cbt not restored on /dev/vdb (.*): its first MiB .* changed since the state was saved .*; the next capture reads /dev/vdb .* whole (hash-diff)" /tmp/r.err \
        || die "message" || return 1
    [ -f /repo/vdb.cbt ] || die "the refused state was removed by cbt restore" || return 1
    bkimg cbt status /dev/vdb >/dev/null 2>&1 && { die "vdb tracked after a refused restore"; return 1; }
    rm -f /repo/vdb.cbt
    # The next incremental: a new generation, so a hash-diff that sees both writes.
    bkimg capture --repo /repo/r-tamper --live --raw --parent latest --store /repo/l.store --store-size 16M --json /dev/vdb \
        >/tmp/c.json 2>/tmp/c.err || { cat /tmp/c.err; die "incremental"; return 1; }
    grep -q '"mode": *"hash-diff"' /tmp/c.json || die "not hash-diff: $(cat /tmp/c.json)" || return 1
    [ "$(bkimg cbt status /dev/vdb --json | jget generation)" != "$gen" ] || die "same generation" || return 1
    rm -f /repo/t.img
    bkimg restore --repo /repo/r-tamper "$(jget id </tmp/c.json)" --target /repo/t.img >/dev/null 2>&1 || die "restore" || return 1
    cmp -s /repo/t.img /dev/vdb || die "the hash-diff incremental restores other bytes than the disk" || return 1
    rm -f /repo/t.img
    bkimg cbt detach /dev/vdb >/dev/null

    # Another device, same bytes: the identity differs (the loop device's backing file).
    dd if=/dev/vdb of=/repo/a.img bs=1M count=16 2>/dev/null
    cp /repo/a.img /repo/b.img
    losetup /dev/loop0 /repo/a.img || die "losetup" || return 1
    bkimg cbt attach /dev/loop0 >/dev/null || return 1
    bkimg cbt detach /dev/loop0 --save /repo/loop.cbt >/dev/null || die "save loop0" || return 1
    losetup -d /dev/loop0 && losetup /dev/loop0 /repo/b.img || die "losetup b" || return 1
    bkimg cbt restore /dev/loop0 /repo/loop.cbt 2>/tmp/r.err
    rc=$?
    cat /tmp/r.err
    [ $rc = 7 ] || die "restore on another loop device: exit $rc" || return 1
    grep -q 'its loop_backing_file is "/repo/b.img", not "/repo/a.img"' /tmp/r.err || die "identity message" || return 1
    losetup -d /dev/loop0
    rm -f /repo/a.img /repo/b.img /repo/loop.cbt

    # Through packaging/cbt-state: refused, discarded, not a failure.
    export BKIMG_CBT_DIR=/repo/cbt-state
    mkdir -p /dev/disk/by-id
    ln -sf ../../vdb /dev/disk/by-id/virtio-vm-vdb
    bkimg cbt attach /dev/vdb >/dev/null || return 1
    sh /root/cbt-state save || die "save failed" || return 1
    [ -f $BKIMG_CBT_DIR/by-id/virtio-vm-vdb.cbt ] || die "no state for vdb" || return 1
    rmmod bksnap || return 1
    pattern behind3 1 | dd of=/dev/vdb bs=1M seek=127 conv=fsync 2>/dev/null
    insmod /root/bksnap.ko || return 1
    sh /root/cbt-state restore 2>/tmp/r.err || { cat /tmp/r.err; die "cbt-state restore failed on a refused state"; return 1; }
    cat /tmp/r.err
    grep -q "not restored on /dev/vdb .*: its last MiB" /tmp/r.err || die "no message from cbt-state" || return 1
    [ -z "$(ls -A $BKIMG_CBT_DIR 2>/dev/null)" ] || die "states left: $(ls -R $BKIMG_CBT_DIR)" || return 1
    bkimg cbt status /dev/vdb >/dev/null 2>&1 && { die "vdb tracked after a refused restore"; return 1; }
    rm -rf $BKIMG_CBT_DIR /dev/disk /repo/r-tamper
    unset BKIMG_CBT_DIR
}

# --verify-cbt-every 3: the third incremental that could use its change map reads the
# disk whole instead, and counts the chunks the tracker missed: a write made while the
# module was unloaded, outside the regions the saved state's fingerprint covers, so the
# restore accepts the state (the fingerprint is a sample) and the map lacks the write.
t_cbt_verify_every() {
    rm -rf /repo/r-ver
    pattern vbase 128 | dd of=/dev/vdb bs=1M conv=fsync 2>/dev/null
    cap() { # NAME [--parent latest]
        local name=$1
        shift
        bkimg capture --repo /repo/r-ver --live --raw --verify-cbt-every 3 "$@" --store /repo/l.store --store-size 16M --json /dev/vdb \
            >"/tmp/$name.json" 2>"/tmp/$name.err" || { cat "/tmp/$name.err"; return 1; }
    }
    bkimg cbt attach /dev/vdb >/dev/null || return 1
    cap full || die "full" || return 1
    pattern v1 1 | dd of=/dev/vdb bs=1M seek=10 conv=fsync 2>/dev/null
    cap i1 --parent latest || die "i1" || return 1
    grep -q '"mode": *"changed-blocks"' /tmp/i1.json || die "i1 not changed-blocks: $(cat /tmp/i1.json)" || return 1
    pattern v2 1 | dd of=/dev/vdb bs=1M seek=20 conv=fsync 2>/dev/null
    cap i2 --parent latest || die "i2" || return 1
    grep -q '"mode": *"changed-blocks"' /tmp/i2.json || die "i2 not changed-blocks: $(cat /tmp/i2.json)" || return 1
    # The missed write: saved, unloaded, written at 64 MiB, reloaded, restored.
    bkimg cbt detach /dev/vdb --save /repo/vdb.cbt >/dev/null || die "save" || return 1
    rmmod bksnap || return 1
    pattern missed 1 | dd of=/dev/vdb bs=1M seek=64 conv=fsync 2>/dev/null
    insmod /root/bksnap.ko || return 1
    bkimg cbt restore /dev/vdb /repo/vdb.cbt >/dev/null || die "restore refused a state the fingerprint cannot tell apart" || return 1
    pattern v3 1 | dd of=/dev/vdb bs=1M seek=30 conv=fsync 2>/dev/null
    cap i3 --parent latest || die "i3" || return 1
    cat /tmp/i3.err
    grep -q '"mode": *"hash-diff"' /tmp/i3.json || die "i3 not a verification: $(cat /tmp/i3.json)" || return 1
    grep -q 'periodic verification (--verify-cbt-every 3)' /tmp/i3.json || die "no reason given" || return 1
    # 1 MiB at 64 MiB in 256 KiB chunks.
    [ "$(jget missed_chunks </tmp/i3.json)" = 4 ] || die "missed_chunks: $(cat /tmp/i3.json)" || return 1
    grep -q "warning: /dev/vdb: 4 chunk(s) changed since the parent that its change map did not list" /tmp/i3.err \
        || die "no warning" || return 1
    rm -f /repo/v.img
    bkimg restore --repo /repo/r-ver "$(jget id </tmp/i3.json)" --target /repo/v.img >/dev/null 2>&1 || die "restore" || return 1
    cmp -s /repo/v.img /dev/vdb || die "the verification restores other bytes than the disk" || return 1
    # The run restarts: the next one uses its map again.
    pattern v4 1 | dd of=/dev/vdb bs=1M seek=40 conv=fsync 2>/dev/null
    cap i4 --parent latest || die "i4" || return 1
    grep -q '"mode": *"changed-blocks"' /tmp/i4.json || die "i4 not changed-blocks: $(cat /tmp/i4.json)" || return 1
    rm -rf /repo/r-ver /repo/v.img
    bkimg cbt detach /dev/vdb >/dev/null
}

ALL="load untracked_writes cbt_basic snapshot_cow consistency_raw multi_device consistency_ext4 consistency_xfs cbt_incremental overflow store_growth save_reload cbt_state unload_busy stacked_loop nested_dm store_hang continuous immutable_store create_undo partition_overlap stress smoke unload_reload"
ALL="$ALL cbt_state_tampered cbt_verify_every"
[ -f /root/tests-extra.sh ] && . /root/tests-extra.sh

insmod /root/bksnap.ko || echo "bksnap-tests: insmod failed"
setup_repo || echo "bksnap-tests: no /repo"
mkdir -p /mnt/fs /mnt/r
selected="$*"
[ -z "$selected" ] || [ "$selected" = all ] && selected=$ALL
for t in $selected; do
    echo "bksnap-tests: run $t"
    start=$(date +%s)
    if ( [ -f /root/trace ] && set -x; "t_$t" ); then
        passed=$((passed + 1))
        echo "bksnap-tests: PASS $t ($(($(date +%s) - start)) s)"
    else
        failed=$((failed + 1))
        echo "bksnap-tests: FAIL $t"
    fi
    cleanup
done
echo "bksnap-tests: $passed passed, $failed failed"
