#!/bin/sh
# Install the RTSP output's engine in the image (run by the Dockerfile, as root, in the runtime
# stage): GStreamer's RTSP server, x264 and PyGObject from Debian, at the size the relay needs.
#   sh packaging/gst-runtime.sh
#
# Debian's own packages, as apt installs them (dpkg knows them, with their dependencies):
# python3-gi, GStreamer's core and base libraries, x264, libjpeg. From six packages whose declared
# dependencies are far larger than what the relay loads, only the files it loads are taken:
#   gstreamer1.0-plugins-{base,good,ugly}: 6 plugin files (appsrc, videoconvert/videoscale,
#     jpegdec, rtph264pay, rtpbin, x264enc), not the ~240 others and their ~300 libraries;
#   libgstrtspserver-1.0-0: the server library, which links GStreamer's core and base libraries
#     only, yet Depends on gstreamer1.0-plugins-bad (GTK, libavcodec, x265, OpenCV... ~270 MB);
#   gir1.2-gst-plugins-base-1.0, gir1.2-gst-rtsp-server-1.0: 6 typelibs, without the GL/mesa/LLVM
#     stack (libgstreamer-gl1.0-0, ~165 MB) the first Depends on for its GstGL typelibs.
# They come from the same package lists as the rest (apt-get download), with their copyright
# files; /usr/share/doc/spotrelay-gstreamer/FILES lists each file with its package and version.
# Every file taken is checked against the libraries installed here (ldd); the Dockerfile then
# starts the engine as the relay does (spotrelay.rtsp.engine.load) and fails the build if it can't.
set -eu
ma=$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("MULTIARCH"))')  # aarch64-linux-gnu
lib=/usr/lib/$ma

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  python3-gi gir1.2-gstreamer-1.0 libgstreamer-plugins-base1.0-0 libx264-164 libjpeg62-turbo \
  >/dev/null

tmp=$(mktemp -d)
cd "$tmp"
apt-get download -qq gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly \
  libgstrtspserver-1.0-0 gir1.2-gst-plugins-base-1.0 gir1.2-gst-rtsp-server-1.0
mkdir root
doc=/usr/share/doc/spotrelay-gstreamer
mkdir -p "$doc"
echo "# Files taken from Debian packages without installing them (packaging/gst-runtime.sh)" \
  >"$doc/FILES"
take() {  # take PACKAGE FILE...: copy files (paths under /) out of PACKAGE's .deb
  pkg=$1; shift
  deb=$(ls "$pkg"_*.deb)
  version=$(dpkg-deb -f "$deb" Version)
  rm -rf root && mkdir root && dpkg-deb -x "$deb" root
  for f in "$@"; do
    [ -e "root$f" ] || { echo "gst-runtime: $pkg $version has no $f" >&2; exit 1; }
    mkdir -p "$(dirname "$f")"
    cp -a "root$f" "$f"
    echo "$f $pkg $version" >>"$doc/FILES"
  done
  mkdir -p "/usr/share/doc/$pkg"
  cp "root/usr/share/doc/$pkg/copyright" "/usr/share/doc/$pkg/copyright"
}
plugins=$lib/gstreamer-1.0
typelibs=$lib/girepository-1.0
take gstreamer1.0-plugins-base "$plugins/libgstapp.so" "$plugins/libgstvideoconvertscale.so"
take gstreamer1.0-plugins-good "$plugins/libgstjpeg.so" "$plugins/libgstrtp.so" \
  "$plugins/libgstrtpmanager.so"
take gstreamer1.0-plugins-ugly "$plugins/libgstx264.so"
so=$(cd "$tmp" && dpkg-deb -c libgstrtspserver-1.0-0_*.deb | grep -o "$lib/libgstrtspserver-1.0.so[.0-9]*")
# shellcheck disable=SC2086  # two names: the library and its soname link
take libgstrtspserver-1.0-0 $so
take gir1.2-gst-plugins-base-1.0 "$typelibs/GstApp-1.0.typelib" "$typelibs/GstRtp-1.0.typelib" \
  "$typelibs/GstRtsp-1.0.typelib" "$typelibs/GstSdp-1.0.typelib" "$typelibs/GstVideo-1.0.typelib"
take gir1.2-gst-rtsp-server-1.0 "$typelibs/GstRtspServer-1.0.typelib"
cd /
rm -rf "$tmp" /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb

# Every shared library the files taken link must be installed here.
missing=$(for f in $(awk '/\.so/ {print $1}' "$doc/FILES"); do ldd "$f"; done | grep 'not found' \
  | sort -u || true)
[ -z "$missing" ] || { echo "gst-runtime: libraries not installed: $missing" >&2; exit 1; }
echo "gst-runtime: $(grep -c '^/' "$doc/FILES") files taken, $(du -sk "$plugins" | cut -f1) KB of plugins"
