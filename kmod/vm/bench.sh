#!/bin/sh
# Benchmark inside the test VM (BENCH=1 kmod/run-vm-tests): write throughput to /dev/vde
# with no tracker, with tracking only, and with a snapshot held (every chunk copied on its
# first write), and read throughput of a snapshot image against the raw device, for dd
# and for a bkimg capture. Emulated CPU (TCG): only the ratios mean anything.
MIB=${BENCH_MIB:-768}
now() { cut -d' ' -f1 /proc/uptime; }
rate() { # START END -> MiB/s
    awk -v s="$1" -v e="$2" -v m="$MIB" 'BEGIN { d = e - s; if (d <= 0) d = 0.01; printf "%.1f\n", m / d }'
}
best() { sort -n | tail -1; }
# The data comes from a file in RAM, made beforehand: generating it would be the bottleneck.
yes "bench data" | head -c $((64 * 1048576)) >/tmp/bench.data
wr() { # -> MiB/s (O_DIRECT, 1 MiB writes, MIB in all, each byte of the disk once)
    s=$(now)
    n=0
    while [ $n -lt $((MIB / 64)) ]; do
        dd if=/tmp/bench.data of=/dev/vde bs=1M seek=$((n * 64)) oflag=direct conv=notrunc 2>/dev/null
        n=$((n + 1))
    done
    e=$(now)
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
    awk -v s="$s" -v e="$e" -v m=1024 'BEGIN { d = e - s; if (d <= 0) d = 0.01; printf "%.1f\n", m / d }'
}

base=$( (wr; wr; wr) | best)
bkimg cbt attach /dev/vde >/dev/null
track=$( (wr; wr; wr) | best)
cow=""
for i in 1 2 3; do
    id=$(bkimg snapshot create /dev/vde --store /repo/bench.store --store-size 800M)
    cow="$cow $(wr)"
    bkimg snapshot destroy "$id" --store /repo/bench.store >/dev/null
done
cow=$(echo $cow | tr ' ' '\n' | best)
id=$(bkimg snapshot create /dev/vde --store /repo/bench.store --store-size 800M)
MIB=256
raw_rd=$( (rd /dev/vde; rd /dev/vde) | best)
img_rd=$( (rd /dev/bksnap$id-0; rd /dev/bksnap$id-0) | best)
raw_cap=$( (cap /dev/vde; cap /dev/vde) | best)
img_cap=$( (cap /dev/bksnap$id-0; cap /dev/bksnap$id-0) | best)
bkimg snapshot destroy "$id" --store /repo/bench.store >/dev/null
bkimg cbt detach /dev/vde >/dev/null
rm -rf /repo/bench-repo /tmp/bench.data
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
echo "bench: write MiB/s (best of 3, 768 MiB O_DIRECT): none $base, tracking $track ($(ratio "$track" "$base")x), snapshot held $cow ($(ratio "$cow" "$base")x)"
echo "bench: read MiB/s: raw device $raw_rd, snapshot image $img_rd ($(ratio "$img_rd" "$raw_rd")x)"
echo "bench: bkimg capture MiB/s of the 1 GiB disk: raw device $raw_cap, snapshot image $img_cap ($(ratio "$img_cap" "$raw_cap")x)"
