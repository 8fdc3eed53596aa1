#!/usr/bin/env bash
# Python wheels for the image, fetched on the host (pip inside a build cannot verify TLS here):
# the pinned runtime dependencies for CPython 3.11 on linux/<arch>, and spotrelay's own wheel.
#   packaging/wheels.sh amd64|arm64   -> .cache/wheels/<arch>/
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:?amd64 or arm64}
case "$arch" in
  amd64) machine=x86_64 ;;
  arm64) machine=aarch64 ;;
  *) echo "wheels: unknown arch $arch" >&2; exit 2 ;;
esac
out=.cache/wheels/$arch
mkdir -p "$out"
py=${PYTHON:-python3}
platforms=()
for glibc in 2_17 2_24 2_27 2_28 2_31 2_34 2_35 2_36; do  # bookworm has glibc 2.36
  platforms+=(--platform "manylinux_${glibc}_${machine}")
done
platforms+=(--platform "manylinux2014_${machine}")
"$py" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
  --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none \
  "${platforms[@]}" -r requirements.lock -d "$out"
rm -f "$out"/spotrelay-*.whl
# Dated by the last commit, not now: the same sources give the same wheel, so Docker's cache holds
# (otherwise every build reinstalls the venv, a minute under qemu).
SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || echo 315532800) \
  "$py" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$out" . >/dev/null
ls "$out" | wc -l | xargs echo "wheels: $arch:" >&2
