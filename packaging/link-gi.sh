#!/bin/sh
# Let a venv import Debian's PyGObject (gi), for the RTSP output, and nothing else of Debian's.
#   packaging/link-gi.sh VENV
# GStreamer's RTSP server and x264 come from Debian's packages (python3-gi,
# gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-{base,good,ugly}); PyGObject on PyPI needs a
# compiler and GStreamer's headers. A .pth naming a folder that holds only a link to Debian's gi
# makes it importable without --system-site-packages, which would let every Debian module shadow
# the venv's pinned wheels. gi is built for Debian's Python 3.11 and loads in any CPython 3.11.
# Without python3-gi this does nothing: the relay then says in one line why RTSP is off.
set -eu
venv=$1
gi=/usr/lib/python3/dist-packages/gi
[ -d "$gi" ] || { echo "link-gi: no $gi (apt-get install python3-gi): RTSP will be off"; exit 0; }
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
version=$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$version" != "3.11" ]; then
  echo "link-gi: Debian's gi is for Python 3.11, this venv has $version: RTSP will be off"
  exit 0
fi
mkdir -p "$venv/debian-gi"
ln -sfn "$gi" "$venv/debian-gi/gi"
(cd "$venv/debian-gi" && pwd) > "$site/debian-gi.pth"
