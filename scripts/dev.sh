#!/usr/bin/env bash
# One entry point for people and CI:
#   scripts/dev.sh demo   set up, then serve the demo knowledge base on http://127.0.0.1:8000
#   scripts/dev.sh test   set up (chromium too, for the browser tests), then run ruff and
#                         the whole test suite
#   scripts/dev.sh stress set up, then tools/stress.py <args>: hostile clients, load, faults
#   scripts/dev.sh bench  set up, then the benchmark (tools/bench.py) <args>, on the data
#                         sets in ../shared/datasets unless --datasets or
#                         LLAMAINDEX_KB_DATASETS names others
#   scripts/dev.sh <args> set up, then python -m llamaindex_kb <args>
set -euo pipefail
cd "$(dirname "$0")/.."

find_python312() {
  local candidate
  # A pyenv shim named python3.12 exists but fails until a version is selected, so
  # every candidate is tried for real, and pyenv's own 3.12 binaries directly.
  for candidate in "${PYTHON:-}" python3.12 \
      "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.12*/bin/python3.12 \
      /usr/local/bin/python3.12 /usr/bin/python3.12 python3; do
    [ -n "$candidate" ] || continue
    if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      command -v "$candidate" || echo "$candidate"
      return 0
    fi
  done
  echo "error: Python 3.12 not found; install it or set PYTHON=/path/to/python3.12" >&2
  return 1
}

setup() {
  if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    rm -rf .venv
    "$(find_python312)" -m venv .venv
  fi
  local stamp=.venv/.requirements.sha256
  local wanted
  wanted=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
    echo "$wanted" > "$stamp"
  fi
}

# The console's browser tests drive Debian's chromium (never a browser Playwright
# downloads): install it when missing, as root or through sudo.
ensure_chromium() {
  command -v chromium >/dev/null 2>&1 && return 0
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing Debian's chromium for the browser tests" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
}

setup
case "${1:-demo}" in
  demo)
    key="${LLAMAINDEX_KB_API_KEY:-demo-key}"
    echo "API key: $key   (set LLAMAINDEX_KB_API_KEY to choose another)"
    LLAMAINDEX_KB_API_KEY="$key" exec .venv/bin/python -m llamaindex_kb serve --demo "${@:2}"
    ;;
  test)
    ensure_chromium
    .venv/bin/python -m ruff check .
    exec .venv/bin/python -m pytest "${@:2}"
    ;;
  stress)
    exec .venv/bin/python tools/stress.py "${@:2}"
    ;;
  bench)
    if [ -z "${LLAMAINDEX_KB_DATASETS:-}" ] && [ -d ../shared/datasets ]; then
      LLAMAINDEX_KB_DATASETS="$(cd ../shared/datasets && pwd)"
      export LLAMAINDEX_KB_DATASETS
    fi
    exec .venv/bin/python -m llamaindex_kb bench "${@:2}"
    ;;
  *)
    exec .venv/bin/python -m llamaindex_kb "$@"
    ;;
esac
