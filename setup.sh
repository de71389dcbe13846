#!/usr/bin/env bash
# Sets up everything edgeconformer needs on a fresh machine, idempotently:
#  1. the speech engines the offline corpus is synthesized with (espeak-ng, flite): apt-get on Debian/Ubuntu,
#     a brew hint on macOS;
#  2. a virtual environment in .venv with the package and its pinned dependencies (re-installed only when
#     pyproject.toml changes).
set -euo pipefail
cd "$(dirname "$0")"

missing=()
for tool in espeak-ng flite; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
if ((${#missing[@]})); then
  if [[ "$(uname -s)" == Darwin ]]; then
    echo "setup: ${missing[*]} not found. Install them with: brew install ${missing[*]}" >&2
    exit 1
  elif command -v apt-get >/dev/null 2>&1; then
    sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
    echo "setup: installing ${missing[*]} with apt-get"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: ${missing[*]} not found; install them with your system's package manager" >&2
    exit 1
  fi
fi

python=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
stamp=".venv/.installed-$(.venv/bin/python -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest()[:16])')"
if [[ ! -f "$stamp" ]]; then
  echo "setup: installing the package and its dependencies into .venv (a few minutes the first time)"
  # On Linux x86_64, PyPI's torch 2.9.1 brings its CUDA libraries: the environment takes about 7.5 GB, and pip
  # unpacks wheels beside it. Say so before pip fails half-way with "No space left on device".
  free_kb=$(df -Pk . | awk 'NR == 2 {print $4}')
  if [[ "$free_kb" =~ ^[0-9]+$ ]] && ((free_kb < 9 * 1024 * 1024)); then
    echo "setup: warning: $((free_kb / 1024)) MB free in $(pwd); a first install needs about 9 GB." \
      "Free some space (or remove an old .venv) if pip stops with 'No space left on device'." >&2
  fi
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
echo "setup: ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
