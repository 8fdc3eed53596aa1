# spotrelay container image: Debian bookworm's Python 3.11, pinned wheels, GStreamer from Debian
# (RTSP), non-root, no compilers.
# Built for linux/amd64 (Spot CORE, laptops) and linux/arm64 (CORE I/O). See `make image`.
#   BASE:   debian:bookworm-slim where a registry is reachable; CI makes one with debootstrap.
#   WHEELS: a folder of wheels made on the host by packaging/wheels.sh (pip cannot fetch in here).
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS build
ARG WHEELS=.cache/wheels/amd64
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
COPY requirements.lock /tmp/requirements.lock
COPY ${WHEELS}/ /tmp/wheels/
RUN python3 -m venv /opt/spotrelay \
 && /opt/spotrelay/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels \
        -r /tmp/requirements.lock \
 && /opt/spotrelay/bin/pip install --no-cache-dir --no-index --no-deps /tmp/wheels/spotrelay-*.whl \
 && /opt/spotrelay/bin/pip uninstall -y -q pip setuptools \
 && find /opt/spotrelay -depth -name __pycache__ -type d -exec rm -rf {} + \
 && rm -rf /opt/spotrelay/lib/python3.11/site-packages/cv2/qt

FROM ${BASE}
# As in debian:bookworm-slim: dpkg installs no manuals, docs or translations, but every package's
# copyright (x264 and GStreamer's plugins are GPL and LGPL, and the image is handed on in a .spx).
RUN printf 'path-exclude %s\n' '/usr/share/doc/*' '/usr/share/man/*' '/usr/share/info/*' \
      '/usr/share/locale/*' '/usr/share/lintian/*' >/etc/dpkg/dpkg.cfg.d/spotrelay-slim \
 && echo 'path-include /usr/share/doc/*/copyright' >>/etc/dpkg/dpkg.cfg.d/spotrelay-slim \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin spotrelay
# The RTSP output's engine from Debian (GStreamer's RTSP server, x264, PyGObject): +23 MB.
# Installed whole, Debian's dependencies would add ~600 MB (plugins-bad, GL); the script takes
# only the files the relay loads and says why (README, "Install on a robot").
COPY packaging/gst-runtime.sh /tmp/packaging/
RUN sh /tmp/packaging/gst-runtime.sh
COPY --from=build /opt/spotrelay /opt/spotrelay
# No USER: the relay starts as root only to read the payload credentials (root's own file on a
# CORE I/O, mounted read-only), then drops for good to uid 10001 before it talks to anyone
# (SPOTRELAY_RUN_AS; see main.drop_privileges).
# GST_REGISTRY: GStreamer's plugin registry, made below, read-only at run time (uid 10001 has
# no home, the root filesystem is read-only, and a new one under qemu takes seconds).
ENV PATH=/opt/spotrelay/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GST_REGISTRY=/opt/spotrelay/gstreamer-registry.bin \
    SPOTRELAY_PORT=21080 \
    SPOTRELAY_BIND=0.0.0.0 \
    SPOTRELAY_RUN_AS=10001:10001
# The venv imports Debian's gi (and only it) through a .pth; then the engine starts as the relay
# starts it (every element, typelib and library there), which also writes the registry.
COPY packaging/link-gi.sh /tmp/packaging/
RUN sh /tmp/packaging/link-gi.sh /opt/spotrelay \
 && python3 -c 'from spotrelay.rtsp import engine; engine.load()' \
 && chmod 0644 "$GST_REGISTRY" \
 && rm -rf /tmp/packaging
# HTTP (21080) and, with SPOTRELAY_RTSP_PORT, RTSP (21082 in docker-compose.yml).
EXPOSE 21080 21082
# The relay ends its streams and exits within a second of SIGTERM.
STOPSIGNAL SIGTERM
# /healthz on SPOTRELAY_PORT, over HTTPS when the relay serves it (SPOTRELAY_TLS).
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
  CMD ["python3", "-m", "spotrelay.healthcheck"]
CMD ["spotrelay"]
