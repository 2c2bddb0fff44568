#!/usr/bin/env bash
# Fetches Debian's 6.1 cloud kernel and extracts from it what the Linux smoke tests boot:
#   resources/images/vmlinuz  - the bzImage as Debian ships it
#   resources/images/vmlinux  - the ELF kernel inside it (LZ4 payload, decompressed)
# Cached: does nothing when both files exist.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
out="$here/resources/images"
mkdir -p "$out"
if [[ -s "$out/vmlinux" && -s "$out/vmlinuz" ]]; then
    exit 0
fi

# lz4 decompresses the kernel's payload; Debian packages it.
if ! command -v lz4 >/dev/null; then
    if [[ $(id -u) -eq 0 ]]; then
        apt-get install -y -qq lz4 >/dev/null
    else
        echo "lz4 is needed to unpack the kernel: apt-get install lz4" >&2
        exit 1
    fi
fi

pick() {
    apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$' |
        cut -d' ' -f1 | sort -V | tail -n1
}
pkg=$(pick || true)
if [[ -z "$pkg" ]]; then
    apt-get update -qq
    pkg=$(pick)
fi
[[ -n "$pkg" ]] || { echo "no linux-image-6.1.0-*-cloud-amd64-unsigned package found" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# As root, apt-get would hand the download to its _apt user, who cannot write here.
sandbox=()
[[ $(id -u) -eq 0 ]] && sandbox=(-o APT::Sandbox::User=root)
(cd "$work" && apt-get download -qq "${sandbox[@]}" "$pkg")
dpkg-deb -x "$work"/*.deb "$work/x"
vmlinuz=$(ls "$work"/x/boot/vmlinuz-*)

# The bzImage's protected-mode part starts after the setup sectors; the compressed payload
# sits at payload_offset (0x248) in it, payload_length (0x24c) bytes long.
u8_at() { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' '; }
u32_at() { od -An -tu4 -j "$2" -N4 "$1" | tr -d ' '; }
setup_sects=$(u8_at "$vmlinuz" $((0x1f1)))
payload_offset=$(u32_at "$vmlinuz" $((0x248)))
payload_length=$(u32_at "$vmlinuz" $((0x24c)))
start=$(( (setup_sects + 1) * 512 + payload_offset ))
dd if="$vmlinuz" of="$work/payload" bs=1M iflag=skip_bytes,count_bytes skip="$start" count="$payload_length" status=none
# Linux appends the decompressed size to the payload; lz4 stops at the end of its frames.
# Its complaint about those trailing bytes is expected; the ELF check below decides.
lz4 -dc "$work/payload" > "$work/vmlinux" 2>"$work/lz4.err" || true
head -c 4 "$work/vmlinux" | grep -q $'\x7fELF' || {
    echo "the kernel payload did not decompress to an ELF; lz4 said: $(cat "$work/lz4.err")" >&2
    exit 1
}

cp "$vmlinuz" "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"
cp "$work/vmlinux" "$out/vmlinux.tmp" && mv "$out/vmlinux.tmp" "$out/vmlinux"
echo "$pkg" > "$out/kernel-package"
echo "Linux kernel ready: $out/vmlinux and $out/vmlinuz ($pkg)"
