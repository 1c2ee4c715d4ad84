#!/usr/bin/env bash
# Installs what tether needs on a Debian 12 machine (as root) and a venv in .venv.
# Idempotent and quick when nothing changed. Usage: scripts/setup.sh [--test]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

pkgs=()
command -v tmux >/dev/null || pkgs+=(tmux)
command -v ssh >/dev/null || pkgs+=(openssh-client)
command -v bwrap >/dev/null || pkgs+=(bubblewrap)
command -v ip >/dev/null || pkgs+=(iproute2)
python3 -c 'import venv, ensurepip' 2>/dev/null || pkgs+=(python3-venv)
if [ "$want_test" = 1 ]; then
  command -v nft >/dev/null || pkgs+=(nftables)
  # the browser tests drive Debian's chromium (Playwright cannot download its own here)
  command -v chromium >/dev/null || pkgs+=(chromium)
fi
if [ ${#pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "tether setup: please install: ${pkgs[*]} (needs root)" >&2
    exit 1
  fi
  echo "tether setup: installing ${pkgs[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq "${pkgs[@]}" >&2
fi

venv="$here/.venv"
extra=""
[ "$want_test" = 1 ] && extra="[test]"
stamp="$venv/.tether-setup-$(cat "$here/pyproject.toml" "$0" | sha256sum | cut -c1-16)$want_test"
if [ ! -e "$stamp" ]; then
  echo "tether setup: preparing $venv" >&2
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
  # compat mode puts a plain path in a .pth file; the default editable finder
  # costs every tether process ~27 ms of imports at start-up
  "$venv/bin/pip" install -q --disable-pip-version-check \
    --config-settings editable_mode=compat -e "$here$extra" >&2
  rm -f "$venv"/.tether-setup-*
  touch "$stamp"
fi
# tether's modules byte-compiled ahead (quick when up to date): where
# PYTHONDONTWRITEBYTECODE is set, as on many CI images, every tether process
# would otherwise compile them from source at start (~50 ms for an agent)
"$venv/bin/python" -m compileall -q "$here/tether" >/dev/null || true
