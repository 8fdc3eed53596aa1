#!/usr/bin/env bash
# Start an image (any platform Docker can run here, e.g. linux/arm64 under qemu) with the built-in
# simulated robot and wait for /healthz and a frame.   packaging/health.sh IMAGE [PLATFORM]
set -euo pipefail
image=${1:?image}; platform=${2:-}
name=spotrelay-health-$$
port=21081
trap 'docker rm -f "$name" >/dev/null 2>&1 || true' EXIT
start=$(date +%s)
docker run -d --name "$name" ${platform:+--platform "$platform"} -p "127.0.0.1:$port:21080" \
  -e SPOTRELAY_SIM=1 "$image" >/dev/null
echo "health: $(docker exec "$name" uname -m) container started"
for _ in $(seq 180); do
  if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/healthz', timeout=2)" 2>/dev/null; then
    echo "health: /healthz answered after $(( $(date +%s) - start )) s"
    if python3 -c "import urllib.request; b=urllib.request.urlopen('http://127.0.0.1:$port/snapshot/back_fisheye_image', timeout=30).read(); assert b[:2]==b'\xff\xd8'" 2>/dev/null; then
      echo "health: snapshot served after $(( $(date +%s) - start )) s: PASS"
      exit 0
    fi
  fi
  sleep 1
done
docker logs "$name" 2>&1 | tail -20
echo "health: FAIL"; exit 1
