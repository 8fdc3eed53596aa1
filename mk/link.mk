# Viewers behind a link slower than the cameras (tests/bench_link.py, tests/shaper.py,
# tests/netlink.py): the relay with queue control off and as shipped, in the same run.

.PHONY: bench-link

## Frames, capture-to-viewer latency and link use behind a shared 10 Mbit/s and 2 Mbit/s link
## (user-space shaper on loopback; ARGS="--shaper tbf" for the kernel's, as root), about 4 minutes.
bench-link: setup
	$(BIN)/python -m tests.bench_link $(ARGS)

.PHONY: bench-rtsp

## RTSP (H.264) against MJPEG passthrough: latency to the decoded picture, encode CPU, ten viewers
## on one encoder, five cameras through 10 Mbit/s (tests/bench_rtsp.py), about two minutes.
bench-rtsp: setup
	$(BIN)/python -m tests.bench_rtsp $(ARGS)
