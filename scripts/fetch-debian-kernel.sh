#!/usr/bin/env bash
# Fetches Debian's cloud kernel (a stock distribution bzImage) for vmm-core's kernel-boot test.
#
#   scripts/fetch-debian-kernel.sh            -> target/debian-kernel/vmlinuz (+ VERSION)
#
# Uses `apt-get download` for linux-image-cloud-amd64 (a meta package) and the versioned
# linux-image-<version>-cloud-amd64 it depends on, and extracts /boot/vmlinuz-* with dpkg-deb.
# Cached: does nothing when target/debian-kernel/vmlinuz exists (delete the directory to refetch).
# The kernel is never committed (target/ is ignored). Needs Debian apt sources (apt-get update
# is run when the package is not found in the local lists).
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/debian-kernel
if [ -s "$out/vmlinuz" ]; then
    echo "fetch-debian-kernel: cached $out/vmlinuz ($(cat "$out/VERSION" 2>/dev/null || echo unknown))"
    exit 0
fi
command -v apt-get >/dev/null || { echo "fetch-debian-kernel: apt-get is required" >&2; exit 1; }
mkdir -p "$out/debs"
cd "$out/debs"

meta=linux-image-cloud-amd64
if ! apt-cache show "$meta" >/dev/null 2>&1; then
    apt-get update -q
fi
# The meta package depends on exactly one versioned image package.
dep=$(apt-cache depends "$meta" | awk '/Depends: linux-image-[0-9].*-cloud-amd64/ {print $2; exit}')
[ -n "$dep" ] || { echo "fetch-debian-kernel: cannot find the image package $meta depends on" >&2; exit 1; }
echo "fetch-debian-kernel: $meta -> $dep"
rm -f ./*.deb
apt-get download -q "$meta" "$dep"
deb=$(ls "$dep"_*.deb | head -n1)
rm -rf extract
dpkg-deb -x "$deb" extract
vmlinuz=$(ls extract/boot/vmlinuz-* | head -n1)
[ -s "$vmlinuz" ] || { echo "fetch-debian-kernel: no vmlinuz in $deb" >&2; exit 1; }
cp "$vmlinuz" ../vmlinuz.tmp
basename "$vmlinuz" | sed 's/^vmlinuz-//' > ../VERSION
mv ../vmlinuz.tmp ../vmlinuz
rm -rf extract
rm -f ./*.deb
echo "fetch-debian-kernel: $(cd .. && pwd)/vmlinuz ($(cat ../VERSION))"
