#!/usr/bin/env bash
# Make sure this machine can build spotrelay images with no image registry: a running Docker
# engine, and a debian:bookworm base image made locally from Debian packages (debootstrap).
#   packaging/docker-ready.sh [amd64|arm64]   -> prints the base image tag to use
set -euo pipefail
arch=${1:-$(dpkg --print-architecture)}
native=$(dpkg --print-architecture)
log() { echo "docker-ready: $*" >&2; }

need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v docker-compose >/dev/null || need+=(docker-compose)
if [ "$arch" != "$native" ]; then
  command -v "qemu-${arch/arm64/aarch64}-static" >/dev/null || need+=(qemu-user-static binfmt-support)
fi
if [ "${#need[@]}" -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

if ! docker info >/dev/null 2>&1; then
  log "starting dockerd (log: /tmp/spotrelay-dockerd.log)"
  nohup dockerd >/tmp/spotrelay-dockerd.log 2>&1 &
  for _ in $(seq 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  if ! docker info >/dev/null 2>&1; then
    log "ERROR: the Docker engine did not start; last lines of its log:"
    tail -n 20 /tmp/spotrelay-dockerd.log >&2 || true
    exit 1
  fi
fi

if [ "$arch" != "$native" ]; then
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  fi
  update-binfmts --enable "qemu-${arch/arm64/aarch64}" >/dev/null 2>&1 || true
fi

# "slim": as debian:bookworm-slim, no manuals, docs or translations (-45 MB), copyrights kept.
tag="spotrelay-base:bookworm-slim-$arch"
if [ "$(docker image inspect -f '{{.Architecture}}' "$tag" 2>/dev/null)" != "$arch" ]; then
  mirror=$( { grep -rhoE '^(URIs:|deb) *https?://[^ ]+' /etc/apt/sources.list.d/ /etc/apt/sources.list \
    2>/dev/null || true; } | awk '$2 ~ /\/debian\/?$/ {print $2; exit}')
  mirror=${mirror:-http://deb.debian.org/debian}
  root=$(mktemp -d /tmp/spotrelay-rootfs.XXXXXX)
  log "debootstrap bookworm ($arch) from $mirror (takes a few minutes)"
  debootstrap --variant=minbase --arch="$arch" bookworm "$root" "$mirror" >/tmp/spotrelay-debootstrap.log 2>&1 \
    || { tail -n 20 /tmp/spotrelay-debootstrap.log >&2; exit 1; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  # What debian:bookworm-slim leaves out (debuerreotype's slimify), now and in later installs.
  printf 'path-exclude %s\n' '/usr/share/doc/*' '/usr/share/man/*' '/usr/share/info/*' \
    '/usr/share/locale/*' '/usr/share/lintian/*' >"$root/etc/dpkg/dpkg.cfg.d/spotrelay-slim"
  echo 'path-include /usr/share/doc/*/copyright' >>"$root/etc/dpkg/dpkg.cfg.d/spotrelay-slim"
  rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/lintian/*
  find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
  find "$root/usr/share/doc" ! -type d ! -name copyright -delete
  # `docker import --platform` is ignored by older engines (the image is labelled with the
  # engine's own architecture); a FROM scratch build with --platform records it correctly.
  ctx=$(mktemp -d /tmp/spotrelay-basectx.XXXXXX)
  tar -C "$root" -cf "$ctx/rootfs.tar" .
  rm -rf "$root"
  printf 'FROM scratch\nADD rootfs.tar /\nCMD ["bash"]\n' >"$ctx/Dockerfile"
  docker build -q --platform "linux/$arch" -t "$tag" "$ctx" >/dev/null 2>&1 \
    || docker build --platform "linux/$arch" -t "$tag" "$ctx" >&2
  rm -rf "$ctx"
  log "made $tag"
fi
echo "$tag"
