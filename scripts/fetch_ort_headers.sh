#!/usr/bin/env bash
# Fetch the ONNX Runtime C/C++ API headers that the native kernel library builds against.
#
# ORT's pip wheels ship no headers. Debian (trixie or newer) packages them as
# libonnxruntime-dev: this script downloads that .deb with `apt-get download` through a
# private, temporary apt configuration holding one trixie sources entry (nothing is added to
# /etc/apt, nothing is installed) and unpacks it with `dpkg -x` into build/ort-headers.
#
# Usage: bash scripts/fetch_ort_headers.sh [DEST]      (DEST defaults to build/ort-headers)
# Env:   ATTN2ONNX_ORT_INCLUDE   a folder that already holds onnxruntime_c_api.h: nothing is
#                                fetched (the native build uses it directly)
#        ATTN2ONNX_DEBIAN_SUITE  suite to fetch from (default trixie)
#        ATTN2ONNX_DEBIAN_MIRROR archive URI (default: the first Debian archive in this
#                                machine's apt sources)
# Prints the include folder (the one holding onnxruntime_c_api.h) on its last line.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${1:-$root/build/ort-headers}

find_include() {  # the folder under $1 that holds onnxruntime_c_api.h
  local hit
  hit=$(find "$1" -name onnxruntime_c_api.h -print -quit 2>/dev/null || true)
  [ -n "$hit" ] && dirname "$hit"
}

if [ -n "${ATTN2ONNX_ORT_INCLUDE:-}" ]; then
  if [ -f "$ATTN2ONNX_ORT_INCLUDE/onnxruntime_c_api.h" ]; then
    echo "$ATTN2ONNX_ORT_INCLUDE"; exit 0
  fi
  echo "ATTN2ONNX_ORT_INCLUDE=$ATTN2ONNX_ORT_INCLUDE holds no onnxruntime_c_api.h" >&2; exit 1
fi
if inc=$(find_include "$dest") && [ -f "$inc/onnxruntime_lite_custom_op.h" ]; then
  echo "$inc"; exit 0
fi

for tool in apt-get dpkg; do
  command -v "$tool" >/dev/null || {
    echo "$tool not found: on a non-Debian system get the ONNX Runtime headers (onnxruntime_c_api.h," \
         "onnxruntime_cxx_api.h, onnxruntime_lite_custom_op.h, version 1.21 or newer) and set" \
         "ATTN2ONNX_ORT_INCLUDE to their folder" >&2; exit 1; }
done

suite=${ATTN2ONNX_DEBIAN_SUITE:-trixie}
mirror=${ATTN2ONNX_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  # The machine's own Debian archive (deb822 .sources files or one-line sources.list).
  mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {for (i = 2; i <= NF; i++) print $i}' \
           | grep -E '/debian/?$' | head -n 1 || true)
  [ -n "$mirror" ] || mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
           | awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; break}}' \
           | grep -E '/debian/?$' | head -n 1 || true)
  [ -n "$mirror" ] || { echo "no Debian archive in /etc/apt sources: set ATTN2ONNX_DEBIAN_MIRROR" >&2; exit 1; }
fi
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$keyring" ] || { echo "$keyring missing (package debian-archive-keyring)" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/sources.d" "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/deb"
cat > "$tmp/sources.d/$suite.sources" <<SRC
Types: deb
URIs: $mirror
Suites: $suite
Components: main
Signed-By: $keyring
SRC
apt_opts=(
  -o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$tmp/sources.d"
  -o Dir::State::Lists="$tmp/lists" -o Dir::Cache="$tmp/cache"
  -o APT::Sandbox::User="$(id -un)" -o Debug::NoLocking=1 -o Acquire::Languages=none
)
echo "fetching libonnxruntime-dev from $suite ($mirror)" >&2
apt-get "${apt_opts[@]}" -qq update >&2
(cd "$tmp/deb" && apt-get "${apt_opts[@]}" -qq download libonnxruntime-dev >&2)
deb=$(ls "$tmp"/deb/libonnxruntime-dev_*.deb)
rm -rf "$dest" && mkdir -p "$dest"
dpkg -x "$deb" "$dest"
basename "$deb" > "$dest/PACKAGE"
inc=$(find_include "$dest") || { echo "$deb holds no onnxruntime_c_api.h" >&2; exit 1; }
echo "$inc"
