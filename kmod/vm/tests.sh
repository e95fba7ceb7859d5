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
    i=0
    yes "bksnap pattern $1" | head -c 1048576 >/tmp/pat.$$
    while [ $i -lt "$2" ]; do cat /tmp/pat.$$; i=$((i + 1)); done
    rm -f /tmp/pat.$$
}

devnum() { # DEV -> MAJOR:MINOR
    cat "/sys/class/block/$(basename "$1")/dev"
}

t_load() {
    [ -c /dev/bksnap ] || die "/dev/bksnap missing" || return 1
    grep -q '^bksnap ' /proc/modules || die "module not listed" || return 1
}

t_untracked_writes() {
    # The hook is in every write's path: untracked devices must be unaffected.
    pattern a 8 | dd of=/dev/vda bs=1M conv=fsync 2>/dev/null || return 1
    dd if=/dev/vda bs=1M count=8 2>/dev/null | cmp - /tmp/expect 2>/dev/null
    pattern a 8 >/tmp/expect
    dd if=/dev/vda bs=1M count=8 2>/dev/null | cmp -s - /tmp/expect || die "read back differs"
}

t_unload_reload() {
    rmmod bksnap || die "rmmod with nothing attached failed" || return 1
    insmod /root/bksnap.ko || die "insmod again failed" || return 1
    [ -c /dev/bksnap ] || die "/dev/bksnap missing after reload"
}

ALL="load untracked_writes unload_reload"
[ -f /root/tests-extra.sh ] && . /root/tests-extra.sh

insmod /root/bksnap.ko || echo "bksnap-tests: insmod failed"
selected="$*"
[ -z "$selected" ] || [ "$selected" = all ] && selected=$ALL
for t in $selected; do
    echo "bksnap-tests: run $t"
    start=$(date +%s)
    if ( set -e; "t_$t" ); then
        passed=$((passed + 1))
        echo "bksnap-tests: PASS $t ($(($(date +%s) - start)) s)"
    else
        failed=$((failed + 1))
        echo "bksnap-tests: FAIL $t"
    fi
done
echo "bksnap-tests: $passed passed, $failed failed"
