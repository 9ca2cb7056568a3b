#!/usr/bin/env bash
# An emulated aarch64 Linux device for the edge tests (tests/test_edge_aarch64.py): Debian's qemu-user runs an
# arm64 Debian Python (its packages extracted by mmdebstrap, nothing run) with the aarch64 wheels of mlcc's
# dependencies, which pip fetches with --platform from pyproject.toml. Nothing of mlcc is installed there: the
# tests copy in the runtime alone. scripts/setup.sh runs it last (after .venv exists).
#
# Kept in $MLCC_AARCH64_DEVICE (default ~/.cache/mlcc-aarch64-device): a rerun does nothing unless
# pyproject.toml's dependencies changed (then only the wheels are fetched again). Where apt, root or the
# network are missing, it says so and leaves the edge tests to skip with that reason.
set -euo pipefail
cd "$(dirname "$0")/.."

device="${MLCC_AARCH64_DEVICE:-${XDG_CACHE_HOME:-$HOME/.cache}/mlcc-aarch64-device}"
mkdir -p "$device"
unavailable() {
    echo "$1" >"$device/unavailable"
    echo "note: no emulated aarch64 device: $1; the aarch64 edge tests will be skipped" >&2
    exit 0
}

if ! command -v qemu-aarch64 >/dev/null || ! command -v mmdebstrap >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
    packages="qemu-user mmdebstrap"
    if ! { $sudo apt-get install -y -q --no-install-recommends $packages ||
        { $sudo apt-get update -q && $sudo apt-get install -y -q --no-install-recommends $packages; }; } >/dev/null 2>&1; then
        unavailable "could not install qemu-user and mmdebstrap (needs Debian's apt and root)"
    fi
fi

# An arm64 Debian bookworm holding Python and the C++ runtime the wheels link against; `extract` unpacks the
# packages without running anything in them, so no binfmt registration or chroot is needed.
if [ ! -x "$device/rootfs/usr/bin/python3" ]; then
    rm -rf "$device/rootfs" "$device/rootfs.partial"
    if ! mmdebstrap --quiet --variant=extract --architectures=arm64 --include=python3,libstdc++6,zlib1g \
        bookworm "$device/rootfs.partial" >"$device/mmdebstrap.log" 2>&1; then
        unavailable "mmdebstrap could not fetch arm64 Debian bookworm (see $device/mmdebstrap.log)"
    fi
    mv "$device/rootfs.partial" "$device/rootfs"
fi
python_version="$(basename "$(readlink -f "$device/rootfs/usr/bin/python3")" | sed 's/^python//')"

# The aarch64 wheels of pyproject.toml's dependencies (the runtime's among them), for the device's Python.
python=".venv/bin/python"
[ -x "$python" ] || python=python3
dependencies="$("$python" -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"])')"
stamp="python $python_version: $dependencies"
if [ "$(cat "$device/site/.mlcc-dependencies" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$device/site" "$device/site.partial"
    platforms=(--platform manylinux2014_aarch64)
    for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_aarch64"); done  # bookworm: glibc 2.36
    abi="cp${python_version/./}"
    # shellcheck disable=SC2086  # the dependencies are one requirement a word
    if ! "$python" -m pip install -q --target "$device/site.partial" --only-binary=:all: "${platforms[@]}" \
        --implementation cp --python-version "$python_version" --abi "$abi" $dependencies >"$device/pip.log" 2>&1; then
        unavailable "pip could not fetch the aarch64 wheels of mlcc's dependencies (see $device/pip.log)"
    fi
    echo "$stamp" >"$device/site.partial/.mlcc-dependencies"
    mv "$device/site.partial" "$device/site"
fi

# The device's python: qemu finds the arm64 loader and libraries under rootfs (-L), Python its stdlib next to
# itself, and the wheels on PYTHONPATH.
mkdir -p "$device/bin"
cat >"$device/bin/python3" <<EOF
#!/bin/sh
export PYTHONPATH="$device/site\${PYTHONPATH:+:\$PYTHONPATH}"
exec qemu-aarch64 -L "$device/rootfs" "$device/rootfs/usr/bin/python3" "\$@"
EOF
chmod +x "$device/bin/python3"
rm -f "$device/unavailable"
echo "aarch64 device: $device/bin/python3 (Python $python_version under qemu-aarch64)" >&2
