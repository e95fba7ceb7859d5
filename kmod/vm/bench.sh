#!/bin/sh
# Benchmark inside the test VM (BENCH=1 kmod/run-vm-tests): write throughput to /dev/vdb
# with no tracker, with tracking only, and with a snapshot held (every chunk copied on its
# first write), and read throughput of a snapshot image against the raw device, for dd
# and for a bkimg capture. Emulated CPU (TCG): only the ratios mean anything.
MIB=${BENCH_MIB:-64}
now() { cut -d' ' -f1 /proc/uptime; }
rate() { # START END -> MiB/s
    awk -v s="$1" -v e="$2" -v m="$MIB" 'BEGIN { d = e - s; if (d <= 0) d = 0.01; printf "%.1f", m / d }'
}
best() { sort -n | tail -1; }
wr() { # SEED -> MiB/s (O_DIRECT, 1 MiB writes, fresh data)
    s=$(now); yes "bench $1" | head -c $((MIB * 1048576)) | dd of=/dev/vdb bs=1M iflag=fullblock oflag=direct 2>/dev/null; e=$(now)
    rate "$s" "$e"
}
rd() { # DEV -> MiB/s
    echo 3 >/proc/sys/vm/drop_caches
    s=$(now); dd if="$1" of=/dev/null bs=1M count=$MIB 2>/dev/null; e=$(now)
    rate "$s" "$e"
}
cap() { # DEV -> MiB/s of a bkimg capture (raw device, all of it read)
    rm -rf /repo/bench-repo
    echo 3 >/proc/sys/vm/drop_caches
    s=$(now); bkimg capture --repo /repo/bench-repo "$1" >/dev/null 2>&1; e=$(now)
    awk -v s="$s" -v e="$e" -v m=128 'BEGIN { d = e - s; if (d <= 0) d = 0.01; printf "%.1f", m / d }'
}

base=$( (wr a; wr b; wr c) | best)
bkimg cbt attach /dev/vdb >/dev/null
track=$( (wr d; wr e; wr f) | best)
cow=""
for i in 1 2 3; do
    id=$(bkimg snapshot create /dev/vdb --store /repo/bench.store --store-size 160M)
    cow="$cow $(wr "g$i")"
    bkimg snapshot destroy "$id" --store /repo/bench.store >/dev/null
done
cow=$(echo $cow | tr ' ' '\n' | best)
id=$(bkimg snapshot create /dev/vdb --store /repo/bench.store --store-size 160M)
raw_rd=$( (rd /dev/vdb; rd /dev/vdb) | best)
img_rd=$( (rd /dev/bksnap$id-0; rd /dev/bksnap$id-0) | best)
raw_cap=$( (cap /dev/vdb; cap /dev/vdb) | best)
img_cap=$( (cap /dev/bksnap$id-0; cap /dev/bksnap$id-0) | best)
bkimg snapshot destroy "$id" --store /repo/bench.store >/dev/null
bkimg cbt detach /dev/vdb >/dev/null
rm -rf /repo/bench-repo
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
echo "bench: write MiB/s (best of 3, ${MIB} MiB O_DIRECT): none $base, tracking $track ($(ratio "$track" "$base")x), snapshot held $cow ($(ratio "$cow" "$base")x)"
echo "bench: read MiB/s: raw device $raw_rd, snapshot image $img_rd ($(ratio "$img_rd" "$raw_rd")x)"
echo "bench: bkimg capture MiB/s of the 128 MiB disk: raw device $raw_cap, snapshot image $img_cap ($(ratio "$img_cap" "$raw_cap")x)"
