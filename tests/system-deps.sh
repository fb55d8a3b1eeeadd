#!/usr/bin/env bash
# What the test suite needs from the system, installed when missing: Debian's chromium (the report
# and dashboard tests open pages in a real headless browser) and the PostgreSQL server (the
# multi-worker tests start a throwaway cluster). `make test` and CI both run this first.
set -euo pipefail

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1; then
  sudo=(sudo)
else
  echo "the tests need ${missing[*]} (Debian packages); install them as root: apt-get install -y ${missing[*]}" >&2
  exit 2
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "the tests need ${missing[*]}; this is not a Debian-like system (no apt-get): install them by hand" >&2
  exit 2
fi
echo "installing ${missing[*]} for the tests (Debian packages) ..." >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
