#!/usr/bin/env bash
# Start an image (any platform Docker can run here, e.g. linux/arm64 under qemu) with the built-in
# simulated robot, read-only with a 16 MB /tmp as on a robot, and wait for /healthz, a frame, and
# an RTSP (H.264) key frame, decoded by ffprobe where it is installed.
#   packaging/health.sh IMAGE [PLATFORM]
set -euo pipefail
image=${1:?image}; platform=${2:-}
here=$(cd "$(dirname "$0")" && pwd)
name=spotrelay-health-$$
port=21081 rtsp_port=21083
frame=$(mktemp /tmp/spotrelay-health.XXXXXX.h264)
trap 'docker rm -f "$name" >/dev/null 2>&1 || true; rm -f "$frame"' EXIT
start=$(date +%s)
docker run -d --name "$name" ${platform:+--platform "$platform"} --read-only --tmpfs /tmp:size=16m \
  -p "127.0.0.1:$port:21080" -p "127.0.0.1:$rtsp_port:21082" \
  -e SPOTRELAY_SIM=1 -e SPOTRELAY_RTSP_PORT=21082 "$image" >/dev/null
echo "health: $(docker exec "$name" uname -m) container started"
served=""
for _ in $(seq 180); do
  if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/healthz', timeout=2)" 2>/dev/null; then
    [ -n "$served" ] || echo "health: /healthz answered after $(( $(date +%s) - start )) s"
    served=healthz
    if python3 -c "import urllib.request; b=urllib.request.urlopen('http://127.0.0.1:$port/snapshot/back_fisheye_image', timeout=30).read(); assert b[:2]==b'\xff\xd8'" 2>/dev/null; then
      echo "health: snapshot served after $(( $(date +%s) - start )) s"
      served=snapshot
      break
    fi
  fi
  sleep 1
done
if [ "$served" != snapshot ]; then
  docker logs "$name" 2>&1 | tail -20
  echo "health: FAIL"; exit 1
fi
if ! out=$(python3 "$here/rtsp_frame.py" --timeout 120 --out "$frame" \
    "rtsp://127.0.0.1:$rtsp_port/back_fisheye_image"); then
  docker logs "$name" 2>&1 | grep -m1 "RTSP off" || docker logs "$name" 2>&1 | tail -20
  echo "health: FAIL: no RTSP frame"; exit 1
fi
echo "health: ${out#rtsp: }"
if command -v ffprobe >/dev/null; then
  decoded=$(ffprobe -v error -f h264 -show_entries frame=width,height,pict_type -of csv=p=0 "$frame" \
    | head -1)
  [ -n "$decoded" ] || { echo "health: FAIL: ffprobe cannot decode the RTSP key frame"; exit 1; }
  echo "health: ffprobe decodes it (width,height,type: ${decoded%,})"
fi
echo "health: PASS after $(( $(date +%s) - start )) s"
