#!/usr/bin/env bash
# ember's test command: installs what the tests need on a fresh Debian machine, fetches the
# Linux kernel the smoke tests boot, then runs the whole suite and the lints.
set -euo pipefail
cd "$(dirname "$0")/../.."

# Debian packages: a C toolchain for linking (static glibc), lz4 for the kernel payload,
# iproute2 for network namespaces in tests.
need=()
for pkg in build-essential libc6-dev lz4 iproute2 curl ca-certificates; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "missing Debian packages: ${need[*]} (run as root, or install them)" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
    echo "cargo is missing: install Rust (stable) first" >&2
    exit 1
fi
rustup component add clippy rustfmt >/dev/null 2>&1 || true

./resources/scripts/get-linux-kernel.sh

cargo fmt --all -- --check
cargo clippy --all-targets --workspace -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --features seccomp-test 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole suite.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "ember: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
