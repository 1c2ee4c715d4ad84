#!/usr/bin/env bash
# Refresh the browser page's vendored xterm.js release files from the npm
# registry (nothing is fetched from a CDN at run time):
#   scripts/vendor-xterm.sh                 # the pinned versions below
#   XTERM_VERSION=6.0.0 FIT_VERSION=0.11.0 scripts/vendor-xterm.sh
# Needs npm. Writes tether/relay/web/static/xterm/ and its VERSIONS file.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
xterm="${XTERM_VERSION:-6.0.0}"
fit="${FIT_VERSION:-0.11.0}"
dest="$here/tether/relay/web/static/xterm"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "@xterm/xterm@$xterm" "@xterm/addon-fit@$fit" >/dev/null)
mkdir -p "$tmp/xterm" "$tmp/fit" "$dest"
tar xzf "$tmp/xterm-xterm-$xterm.tgz" -C "$tmp/xterm"
tar xzf "$tmp/xterm-addon-fit-$fit.tgz" -C "$tmp/fit"
cp "$tmp/xterm/package/lib/xterm.js" "$tmp/xterm/package/css/xterm.css" "$dest/"
cp "$tmp/xterm/package/LICENSE" "$dest/LICENSE"
cp "$tmp/fit/package/lib/addon-fit.js" "$dest/addon-fit.js"
cp "$tmp/fit/package/LICENSE" "$dest/LICENSE.addon-fit"
{
  echo "# vendored by scripts/vendor-xterm.sh; MIT licence in LICENSE"
  echo "@xterm/xterm $xterm"
  echo "@xterm/addon-fit $fit"
  (cd "$dest" && sha256sum xterm.js xterm.css addon-fit.js)
} > "$dest/VERSIONS"
echo "vendored @xterm/xterm $xterm and @xterm/addon-fit $fit into $dest" >&2
