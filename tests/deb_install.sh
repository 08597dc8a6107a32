#!/usr/bin/env bash
# The Debian package under a real systemd: builds the amd64 .deb from the debug binary that
# `cargo test` already built (cargo deb --no-build --profile dev; every other file in it is the
# shipped one), boots a Debian bookworm root with `systemd-nspawn -b` and runs
# tests/nspawn/deb_install.check.sh inside: dpkg -i starts the service (ready, watchdog kept,
# own user, waits for a broker, stores what Mosquitto delivers, API keys by LoadCredential=
# and never in the journal, systemd-analyze security ≤ 2.0, clean stop), then upgrade, remove,
# purge and a bad config. Real: systemd 252, dpkg, Mosquitto, the package. Faked: nothing;
# the Golioth lane points at a loopback port where nothing listens.
#
# The root (debootstrap, tests/nspawn/make-rootfs.sh, plus Mosquitto) is built once into
# target/nspawn/rootfs, about a minute, and reused while its recipe is unchanged; each run
# boots a throw-away overlay of it (--volatile=overlay), which takes under a second.
#
# Needs root, systemd-nspawn and debootstrap (`apt-get install systemd-container
# debootstrap`; .ci/test installs them) and network access to the Debian mirror for the first
# root. A missing prerequisite prints SKIPPED, or fails with CI=true.
#
# Usage: tests/deb_install.sh   (from anywhere; run by .ci/test after cargo test)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
start=$SECONDS

skip() {
    if [ "${CI:-}" = true ]; then
        echo "FAIL deb_install: $* (CI=true: a missing prerequisite fails the run)" >&2
        exit 1
    fi
    echo "=== SKIPPED deb_install: $* ===" >&2
    exit 0
}

[ "$(id -u)" = 0 ] || skip "needs root (systemd-nspawn, debootstrap, dpkg in a container)"
for tool in systemd-nspawn debootstrap nsenter readelf; do
    command -v "$tool" >/dev/null || skip "$tool is missing: apt-get install systemd-container debootstrap"
done
. packaging/cargo-deb.sh
ensure_cargo_deb || skip "cargo-deb $CARGO_DEB_VERSION could not be installed"

# The root, once per recipe. The stamp is a hash of the recipe: change it and the root is rebuilt.
mkdir -p target/nspawn
exec 9>target/nspawn/lock
flock 9
root=target/nspawn/rootfs
# ca-certificates: a Depends of the package (dpkg -i does not fetch dependencies).
packages="mosquitto mosquitto-clients ca-certificates"
stamp=$( (cat tests/nspawn/make-rootfs.sh; echo "$packages") | sha256sum | cut -c1-16)
if [ "$(cat "$root/.nngw-rootfs" 2>/dev/null)" != "$stamp" ]; then
    t=$SECONDS
    rm -rf "$root" "$root.new"
    bash tests/nspawn/make-rootfs.sh "$root.new" >target/nspawn/rootfs.log 2>&1 ||
        { tail -20 target/nspawn/rootfs.log; echo "FAIL deb_install: debootstrap failed (log: target/nspawn/rootfs.log)" >&2; exit 1; }
    m=nngwroot$$
    # nspawn may exit non-zero here although the install worked (it cannot remove
    # /run/systemd/nspawn/propagate/NAME on a disk-backed /run): judge by the result.
    systemd-nspawn -q -D "$root.new" -M "$m" --register=no --keep-unit bash -c \
        "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages && apt-get clean" \
        >>target/nspawn/rootfs.log 2>&1 </dev/null || true
    rm -rf "/run/systemd/nspawn/propagate/$m"
    [ -x "$root.new/usr/sbin/mosquitto" ] && [ -x "$root.new/usr/bin/mosquitto_pub" ] ||
        { tail -20 target/nspawn/rootfs.log; echo "FAIL deb_install: installing $packages into the root failed" >&2; exit 1; }
    echo "$stamp" >"$root.new/.nngw-rootfs"
    mv "$root.new" "$root"
    echo "root built in $((SECONDS - t)) s: $root"
fi

# The packages: the binary `cargo test` built, and the shipped files. cargo-deb warns that the
# dev profile is meant for releases only; its output goes to a log unless it fails.
cargo build --locked --quiet --bin nn-gateway
check_deb_depends target/debug/nn-gateway
debs=target/nspawn/debs
rm -rf "$debs"
mkdir -p "$debs"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
t=$SECONDS
for n in 1 2; do
    cargo deb --no-build --locked --profile dev --fast --deb-version "$version-$n" \
        -o "$debs/nn-gateway_$n.deb" >"$debs/cargo-deb-$n.log" 2>&1 ||
        { cat "$debs/cargo-deb-$n.log"; echo "FAIL deb_install: cargo deb failed" >&2; exit 1; }
done
echo "packages built in $((SECONDS - t)) s: $debs/nn-gateway_1.deb ($version-1), nn-gateway_2.deb ($version-2)"

t=$SECONDS
rc=0
LOG=target/nspawn/boot.log bash tests/nspawn/check-unit.sh "$root" tests/nspawn/deb_install.check.sh \
    "--bind-ro=$repo/$debs:/debs" || rc=$?
echo "container checks took $((SECONDS - t)) s (whole test $((SECONDS - start)) s); boot log: target/nspawn/boot.log"
if [ "$rc" != 0 ]; then
    echo "FAIL deb_install: the checks in the container failed (exit status $rc)" >&2
    exit "$rc"
fi
echo "ok   deb_install: the package installs, runs, upgrades, is removed and purged as documented"
