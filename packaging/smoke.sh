#!/usr/bin/env bash
# Container smoke test: run docker-compose.yml as the robot would (bridge network, port 21080,
# payload credentials mounted read-only), against the simulated robot in a second container made
# from the same image, and check what a user relies on:
#   the payload credentials are root's 0600 file (as on a CORE I/O) and the root filesystem is
#   read-only, yet a frame arrives through the mapped port; the relay runs as uid 10001, Docker
#   reports it healthy, and `docker stop` ends it cleanly within 2 s. The Autowalk callback
#   registers in the robot's directory, answers on the published port 21081 (driven with
#   bosdyn-mission's RemoteClient from a host-network container) and writes its pictures to the
#   captures volume as uid 10001; a caller that is not on the allowed address (a container on
#   Docker's bridge) is refused. RTSP (H.264) plays through the published port 21082: ffprobe
#   decodes a frame (or, without ffprobe, packaging/rtsp_frame.py receives a key frame), with
#   GStreamer's registry read from the image and nothing written to /tmp.
#   packaging/smoke.sh spotrelay:0.1.0
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:?image tag}
project=spotrelay-smoke
sim=spotrelay-smoke-sim
work=$(mktemp -d /tmp/spotrelay-smoke.XXXXXX)
mkdir -p "$work/sim" "$work/creds" "$work/captures"
chmod 0777 "$work/sim"
say() { echo "smoke: $*"; }
compose() { SPOTRELAY_PUBLISH_IP=127.0.0.1 SPOTRELAY_MISSION_PUBLISH_IP=127.0.0.1 docker-compose -p "$project" -f docker-compose.yml -f "$work/override.yml" "$@"; }
cleanup() {
  compose down -t 1 >/dev/null 2>&1 || true
  docker rm -f "$sim" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
cleanup_old() { docker rm -f "$sim" >/dev/null 2>&1 || true; }
cleanup_old

say "simulated robot in container $sim"
docker run -d --name "$sim" -v "$work/sim:/sim" "$image" \
  python3 -m spotrelay.sim --host 0.0.0.0 --port 50443 --cert-dir /sim >/dev/null
info=""
for _ in $(seq 60); do
  info=$(docker logs "$sim" 2>/dev/null | grep -m1 '^{' || true)
  [ -n "$info" ] && break
  sleep 0.5
done
[ -n "$info" ] || { docker logs "$sim"; say "FAIL: the simulated robot did not start"; exit 1; }
sim_ip=$(docker inspect -f '{{.NetworkSettings.IPAddress}}' "$sim")
python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(d["guid"]); print(d["secret"])' "$info" \
  > "$work/creds/payload_guid_and_secret"
chown 0:0 "$work/creds/payload_guid_and_secret"
chmod 0600 "$work/creds/payload_guid_and_secret"
chmod 0700 "$work/creds"

# The callback is reached through the loopback port: Docker's proxy calls from the bridge's
# gateway, so that is the one caller allowed here (on a robot: the robot's own address).
gateway=$(docker inspect -f '{{.NetworkSettings.Gateway}}' "$sim")

cat > "$work/override.yml" <<YAML
version: "2.4"
services:
  spotrelay:
    image: $image
    environment:
      SPOTRELAY_ROBOT: "$sim_ip"
      SPOTRELAY_ROBOT_PORT: "50443"
      SPOTRELAY_ROBOT_CERT: /sim/sim-robot-ca.pem
      SPOTRELAY_MISSION_ALLOW: "$gateway"
    volumes:
      - $work/sim:/sim:ro
      - $work/creds:/opt/payload_credentials:ro
      - $work/captures:/captures
    logging:
      driver: json-file   # no journald on a build machine
YAML

say "relay from docker-compose.yml (payload credentials, bridge network, port 21080)"
compose up -d >/dev/null 2>&1 || { compose up -d; exit 1; }
cid=$(compose ps -q spotrelay)

say "reading a frame through 127.0.0.1:21080"
if ! python3 - <<'PY'
import http.client, sys, time
deadline = time.time() + 90
while time.time() < deadline:
    try:
        c = http.client.HTTPConnection("127.0.0.1", 21080, timeout=10)
        c.request("GET", "/stream/back_fisheye_image")
        r = c.getresponse()
        if r.status == 200:
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += r.read(1)
            length = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
            body = r.read(length)
            assert body[:2] == b"\xff\xd8" and len(body) == length, "not a JPEG"
            print(f"smoke: got a {length}-byte JPEG from the container")
            sys.exit(0)
    except (OSError, http.client.HTTPException):
        pass
    time.sleep(1)
sys.exit(1)
PY
then
  docker logs "$cid" 2>&1 | tail -20
  say "FAIL: no frame through the mapped port"
  exit 1
fi

url=rtsp://127.0.0.1:21082/back_fisheye_image
rtsp_state() { docker logs "$cid" 2>&1 | grep -m1 -oE "RTSP (on |off: .*)" || true; }
for _ in $(seq 40); do [ -n "$(rtsp_state)" ] && break; sleep 0.5; done
case "$(rtsp_state)" in
  "RTSP on ") ;;
  *) say "FAIL: RTSP is not on ($(rtsp_state))"; exit 1 ;;
esac
say "reading RTSP through 127.0.0.1:21082"
rtsp_ok=""
for _ in 1 2 3; do
  if command -v ffprobe >/dev/null; then
    # ffprobe decodes the first frame; one JSON document, summed up in one line.
    rtsp_ok=$(timeout 60 ffprobe -v error -rtsp_transport tcp -select_streams v -read_intervals '%+#1' \
      -show_entries stream=codec_name:frame=width,height,pict_type -of json "$url" 2>/dev/null \
      | python3 -c 'import json, sys
d = json.load(sys.stdin); s, f = d["streams"][0], d["frames"][0]
assert s["codec_name"] == "h264"
print("ffprobe decoded an H.264 frame (%s, %dx%d)" % (f["pict_type"], f["width"], f["height"]))' \
      2>/dev/null) && break
  else
    rtsp_ok=$(python3 packaging/rtsp_frame.py --timeout 60 "$url" 2>&1) && break
  fi
  rtsp_ok=""
  sleep 2
done
[ -n "$rtsp_ok" ] || { docker logs "$cid" 2>&1 | tail -20; say "FAIL: no RTSP frame through 127.0.0.1:21082"; exit 1; }
say "RTSP: $rtsp_ok"
tmp_used=$(docker exec "$cid" sh -c 'ls -A /tmp | wc -l')
[ "$tmp_used" = 0 ] || { docker exec "$cid" ls -la /tmp; say "FAIL: the relay wrote to /tmp"; exit 1; }
# GStreamer as the relay's user starts it: the image's registry is current, so nothing is rescanned.
# (Its log is read whole, not piped to grep -q: grep leaving at the first match made docker exec
# fail on a closed pipe when more followed, and pipefail read that as a rescan.)
registry_log=$(docker exec -u 10001:10001 -e GST_DEBUG=GST_REGISTRY:4 "$cid" python3 -c 'import gi
gi.require_version("Gst", "1.0")
from gi.repository import Gst
Gst.init(None)' 2>&1) || true
grep -q "Registry cache has not changed" <<<"$registry_log" \
  || { tail -20 <<<"$registry_log"; say "FAIL: GStreamer rescans its plugins as uid 10001 (GST_REGISTRY)"; exit 1; }
say "GStreamer's registry read from the image; nothing written to /tmp; $(docker stats --no-stream \
  --format '{{.MemUsage}}' "$cid" | sed 's| / | of |') memory in use"

uid=$(docker exec "$cid" awk '/^Uid:/ {print $2 "/" $3}' /proc/1/status)
[ "$uid" = "10001/10001" ] || { say "FAIL: the relay runs as uid $uid, not 10001"; exit 1; }
say "the relay (pid 1) runs as uid 10001 after reading root's 0600 credentials"
if docker exec "$cid" sh -c 'touch /opt/spotrelay/x' 2>/dev/null; then
  say "FAIL: the root filesystem is writable"; exit 1
fi
say "the root filesystem is read-only"

registered() { grep -q "registered in the robot's directory" <<<"$(docker logs "$cid" 2>&1)"; }
for _ in $(seq 40); do registered && break; sleep 0.5; done
registered || { docker logs "$cid" 2>&1 | tail -20; say "FAIL: the Autowalk callback did not register"; exit 1; }
say "the Autowalk callback registered in the robot's directory"
if ! docker run --rm -i --network host "$image" python3 - <<'PY'
import sys, time, grpc
from bosdyn.api import service_customization_pb2 as sc
from bosdyn.mission.remote_client import RemoteClient
c = RemoteClient()
c.channel = grpc.insecure_channel("127.0.0.1:21081")
session = c.establish_session(lease_resources=(), timeout=10)
params = sc.DictParam()
params.values["cameras"].list_value.values.add().string_value.value = "back_fisheye_image"
for _ in range(200):
    resp = c.tick(session, lease_resources=(), params=params, group_name="smoke")
    if resp.status != resp.STATUS_RUNNING:
        break
    time.sleep(0.05)
c.teardown_session(session)
print(f"smoke: Autowalk capture tick: {resp.status} {resp.error_message}")
sys.exit(0 if resp.status == resp.STATUS_SUCCESS else 1)
PY
then
  docker logs "$cid" 2>&1 | tail -20
  say "FAIL: no capture through the callback's port 21081"
  exit 1
fi
shot=$(ls "$work/captures"/*back_fisheye_image.jpg 2>/dev/null | head -1 || true)
[ -n "$shot" ] && [ "$(stat -c %u "$shot")" = 10001 ] \
  || { ls -ln "$work/captures"; say "FAIL: no picture written by uid 10001 in the captures volume"; exit 1; }
say "a capture through port 21081 is on the volume, written by uid 10001"
relay_ip=$(docker inspect -f '{{.NetworkSettings.IPAddress}}' "$cid")
if ! docker run --rm -i "$image" python3 - "$relay_ip" <<'PY'
import sys, grpc
from bosdyn.client.exceptions import PermissionDeniedError
from bosdyn.mission.remote_client import RemoteClient
c = RemoteClient()
c.channel = grpc.insecure_channel(f"{sys.argv[1]}:21081")
try:
    c.establish_session(lease_resources=(), timeout=10)
except PermissionDeniedError as exc:
    print(f"smoke: a caller on the bridge is refused: {exc.error.details()}")
    sys.exit(0)
sys.exit(1)
PY
then
  say "FAIL: a caller that is not the robot drove the callback"
  exit 1
fi

for _ in $(seq 40); do
  health=$(docker inspect -f '{{.State.Health.Status}}' "$cid")
  [ "$health" = healthy ] && break
  sleep 1
done
[ "$health" = healthy ] || { say "FAIL: Docker health is '$health'"; exit 1; }
say "Docker HEALTHCHECK: $health"

start=$(date +%s.%N)
docker stop -t 10 "$cid" >/dev/null
took=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$start" "$(date +%s.%N)")
code=$(docker inspect -f '{{.State.ExitCode}}' "$cid")
say "docker stop took ${took} s, exit code $code"
python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) < 2.0 else 1)" "$took" \
  || { say "FAIL: stopping took ${took} s (limit 2 s)"; exit 1; }
[ "$code" = 0 ] || { docker logs "$cid" 2>&1 | tail -5; say "FAIL: exit code $code"; exit 1; }
say "PASS"
