#!/usr/bin/env bash
# Install CRIU 4.1.1 from Debian trixie into a private prefix, without
# touching the system's packages or its libc.
#
#   scripts/install-criu.sh            # prints the wrapper's path when done
#   LAZYPAGED_CRIU_PREFIX=/some/dir scripts/install-criu.sh
#
# Debian bookworm's criu 3.17 cannot dump on current kernels (vDSO layout),
# and trixie's criu needs trixie's libc. So: a private apt configuration
# whose source list is this machine's Debian list with the suite changed to
# trixie, `apt-get download` of criu, libcompel1 and their recursive
# dependencies, `dpkg -x` of each into the prefix, and a wrapper that runs
# the prefix's criu through the prefix's own dynamic loader and libraries.
#
# Idempotent: once "$PREFIX/bin/criu --version" works, nothing is fetched.
set -euo pipefail

PREFIX=${LAZYPAGED_CRIU_PREFIX:-/var/cache/lazypaged-criu}
SUITE=${LAZYPAGED_CRIU_SUITE:-trixie}
WANT_VERSION=${LAZYPAGED_CRIU_VERSION:-4.1.1}
WRAPPER="$PREFIX/bin/criu"

if [ -x "$WRAPPER" ] && "$WRAPPER" --version 2>/dev/null | grep -q "Version: $WANT_VERSION"; then
    echo "$WRAPPER"
    exit 0
fi

for tool in apt-get apt-cache dpkg-deb; do
    command -v "$tool" >/dev/null || { echo "install-criu: $tool not found (Debian-based system needed)" >&2; exit 1; }
done

APT="$PREFIX/apt"
ROOT="$PREFIX/root"
rm -rf "$ROOT" "$APT/sources.list.d"
mkdir -p "$APT/sources.list.d" "$APT/lists/partial" "$APT/archives/partial" "$APT/debs" "$ROOT" "$PREFIX/bin"

# This machine's Debian sources, with every bookworm-era suite renamed.
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
found=0
for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] || continue
    grep -qiE '^URIs:.*debian' "$f" || continue
    sed -E "/^Suites:/ s/\b${codename}\b/${SUITE}/g" "$f" > "$APT/sources.list.d/$(basename "$f")"
    found=1
done
if [ -f /etc/apt/sources.list ] && grep -qE '^deb .*debian' /etc/apt/sources.list; then
    grep -E '^deb .*debian' /etc/apt/sources.list | sed -E "s/\b${codename}\b/${SUITE}/g" \
        > "$APT/sources.list.d/system.list"
    found=1
fi
if [ "$found" = 0 ]; then
    echo "install-criu: no Debian entry found in /etc/apt/sources.list{,.d}" >&2
    exit 1
fi

apt_opts=(
    -o "Dir::Etc::sourcelist=/dev/null"
    -o "Dir::Etc::sourceparts=$APT/sources.list.d"
    -o "Dir::State::Lists=$APT/lists"
    -o "Dir::Cache=$APT"
    -o "Dir::Cache::archives=$APT/archives"
    -o "Dir::Cache::pkgcache="
    -o "Dir::Cache::srcpkgcache="
    -o "Dir::State::status=/dev/null"
    -o "APT::Get::List-Cleanup=false"
    -o "Debug::NoLocking=true"
    -o "Acquire::Languages=none"
    -o "APT::Sandbox::User=root"
)

echo "install-criu: fetching the $SUITE package lists" >&2
apt-get "${apt_opts[@]}" -q update >&2

# Every package criu and libcompel1 need, recursively (virtual packages
# appear in <angle brackets> and are skipped: a real provider is listed too).
mapfile -t pkgs < <(
    apt-cache "${apt_opts[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts \
        --no-breaks --no-replaces --no-enhances --no-pre-depends criu libcompel1 \
    | grep -E '^[a-z0-9]' | sort -u
)
# Pre-Depends matter too (e.g. libc6's); add them with a second pass.
mapfile -t pre < <(
    apt-cache "${apt_opts[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts \
        --no-breaks --no-replaces --no-enhances criu libcompel1 \
    | grep -E '^[a-z0-9]' | sort -u
)
mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" "${pre[@]}" | sort -u)
echo "install-criu: downloading ${#pkgs[@]} packages" >&2
(cd "$APT/debs" && rm -f ./*.deb && apt-get "${apt_opts[@]}" -q download "${pkgs[@]}" >&2)

for deb in "$APT/debs"/*.deb; do
    dpkg-deb -x "$deb" "$ROOT"
done

ld="$ROOT/lib64/ld-linux-x86-64.so.2"
[ -e "$ld" ] || ld="$ROOT/usr/lib64/ld-linux-x86-64.so.2"
[ -e "$ld" ] || ld=$(find "$ROOT" -name 'ld-linux-*.so.*' | head -n1)
[ -n "$ld" ] && [ -e "$ld" ] || { echo "install-criu: no dynamic loader in the prefix" >&2; exit 1; }
# Resolve the loader's symlink inside the prefix (it points at an absolute path).
if [ -L "$ld" ]; then
    target=$(readlink "$ld")
    case "$target" in /*) ld="$ROOT$target" ;; *) ld="$(dirname "$ld")/$target" ;; esac
fi
ld=$(realpath -m "$ld")
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
libpath="$ROOT/usr/lib/$multiarch:$ROOT/lib/$multiarch:$ROOT/usr/lib:$ROOT/lib"

cat > "$WRAPPER.tmp" <<WRAP
#!/bin/sh
# criu from Debian $SUITE, run through its own loader and libraries.
exec "$ld" --library-path "$libpath" "$ROOT/usr/sbin/criu" "\$@"
WRAP
chmod 755 "$WRAPPER.tmp"
mv "$WRAPPER.tmp" "$WRAPPER"

if ! "$WRAPPER" --version | grep -q "Version: $WANT_VERSION"; then
    echo "install-criu: installed criu is not $WANT_VERSION:" >&2
    "$WRAPPER" --version >&2 || true
    exit 1
fi
rm -rf "$APT/debs" "$APT/archives"
echo "$WRAPPER"
