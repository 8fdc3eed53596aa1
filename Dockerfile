# spotrelay container image: Debian bookworm's Python 3.11, pinned wheels, non-root, no compilers.
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
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /usr/share/doc/* /usr/share/man/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin spotrelay
COPY --from=build /opt/spotrelay /opt/spotrelay
# No USER: the relay starts as root only to read the payload credentials (root's own file on a
# CORE I/O, mounted read-only), then drops for good to uid 10001 before it talks to anyone
# (SPOTRELAY_RUN_AS; see main.drop_privileges).
ENV PATH=/opt/spotrelay/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SPOTRELAY_PORT=21080 \
    SPOTRELAY_BIND=0.0.0.0 \
    SPOTRELAY_RUN_AS=10001:10001
EXPOSE 21080
# The relay ends its streams and exits within a second of SIGTERM.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SPOTRELAY_PORT', '21080'), timeout=2)"]
CMD ["spotrelay"]
