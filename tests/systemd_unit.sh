#!/bin/sh
# Checks systemd/nn-gateway.service and systemd/nn-gateway.sysusers.conf with systemd's own
# tools; needs no running systemd and no root.
#
# - `systemd-analyze verify` must print nothing. It runs on a copy whose ExecStart= points at a
#   dummy executable, because verify rejects a missing /usr/bin/nn-gateway and this check
#   must neither need an installed gateway nor write outside its temporary directory.
# - `systemd-analyze security --offline=yes` must rate the unit at or below MAX_EXPOSURE.
# - `systemd-sysusers` must accept the sysusers.d file (applied to an empty temporary root).
#
# Prints SKIP and exits 0 where systemd-analyze is not installed.
#
# Usage: tests/systemd_unit.sh        (from anywhere; paths are relative to this script)

set -eu

MAX_EXPOSURE=2.0

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "SKIP systemd_unit: systemd-analyze not installed"
    exit 0
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
unit="$repo/systemd/nn-gateway.service"
sysusers="$repo/systemd/nn-gateway.sysusers.conf"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM

failed=0
fail() {
    echo "FAIL $*"
    failed=1
}

# 1. verify, against a copy whose ExecStart= binary exists.
printf '#!/bin/sh\nexit 0\n' >"$work/nn-gateway"
chmod 755 "$work/nn-gateway"
sed "s|/usr/bin/nn-gateway|$work/nn-gateway|g" "$unit" >"$work/nn-gateway.service"
if verify_out=$(systemd-analyze verify "$work/nn-gateway.service" 2>&1) && [ -z "$verify_out" ]; then
    echo "ok   systemd-analyze verify: no warnings"
else
    fail "systemd-analyze verify printed:"
    printf '%s\n' "$verify_out"
fi

# 2. security exposure, on the unit as shipped.
security_out=$(systemd-analyze security --offline=yes "$unit" 2>&1) || true
score=$(printf '%s\n' "$security_out" |
    sed -n 's/.*Overall exposure level for nn-gateway\.service: \([0-9][0-9]*\.[0-9]\).*/\1/p')
if [ -z "$score" ]; then
    fail "systemd-analyze security printed no overall exposure level:"
    printf '%s\n' "$security_out"
elif awk -v s="$score" -v max="$MAX_EXPOSURE" 'BEGIN { exit !(s <= max) }'; then
    echo "ok   systemd-analyze security: exposure $score (limit $MAX_EXPOSURE)"
else
    fail "systemd-analyze security: exposure $score is above $MAX_EXPOSURE"
    printf '%s\n' "$security_out" | grep '✗' || true
fi

# 3. sysusers.d file, applied to an empty root.
if command -v systemd-sysusers >/dev/null 2>&1; then
    mkdir -p "$work/root/etc"
    if sysusers_out=$(systemd-sysusers --root="$work/root" - <"$sysusers" 2>&1) &&
        grep -q '^nn-gateway:' "$work/root/etc/passwd"; then
        echo "ok   systemd-sysusers: creates user nn-gateway"
    else
        fail "systemd-sysusers did not create nn-gateway:"
        printf '%s\n' "$sysusers_out"
    fi
else
    echo "SKIP systemd-sysusers not installed"
fi

exit "$failed"
