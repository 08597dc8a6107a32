# Sourced by packaging/build-deb and tests/deb_install.sh: makes `cargo deb` available.
# cargo-deb is a cargo subcommand, not a dependency of the gateway; this pins the version that
# the packaging was written and tested against (its systemd-units and sysusers support, and
# --no-build --profile dev, which the install test uses to package the debug binary).
CARGO_DEB_VERSION=3.8.0

ensure_cargo_deb() {
    if cargo deb --version >/dev/null 2>&1; then
        return 0
    fi
    echo "installing cargo-deb $CARGO_DEB_VERSION (about 90 s)"
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked --quiet
}

# The package declares `Depends: libc6 (>= 2.34)` for every architecture rather than asking
# dpkg-shlibdeps, which cannot resolve a foreign architecture's libc on the build machine.
# This keeps that line true: the binary may need only glibc's libraries (libgcc_s is in every
# Debian system) and no symbol newer than GLIBC_2.34.
check_deb_depends() {
    local bin=$1 needed newest
    needed=$(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' |
        grep -Ev '^(libc\.so\.6|libm\.so\.6|libgcc_s\.so\.1|ld-linux.*\.so\.[0-9]+)$' || true)
    if [ -n "$needed" ]; then
        echo "$bin links libraries the package does not depend on: $needed" >&2
        return 1
    fi
    newest=$(readelf --dyn-syms -W "$bin" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)
    if [ "$(printf '%s\n' GLIBC_2.34 "$newest" | sort -V | tail -1)" != GLIBC_2.34 ]; then
        echo "$bin needs $newest, newer than the package's Depends: libc6 (>= 2.34)" >&2
        return 1
    fi
}
