#!/usr/bin/env bash
# A/B on the GPU host: install several kvfs trees side by side and run one benchmark against each, in
# one run, so the "before" and "after" rows share the machine (its run-to-run noise is large).
#
#   bench/device_ab.sh OUT WHEELS TREE... -- BENCH_SCRIPT ARGS...
#
# WHEELS: a folder of the dependency wheels (trio, msgspec, rocksdict, kvikio...), installed once.
# TREE: a kvfs checkout (the repo itself, or a copy of another commit: `git worktree add` or `git archive`);
# each is installed (named after its folder) with `pip install --no-deps --target /tmp/ab/<name>` and its results land in
# OUT/<name>/. BENCH_SCRIPT is a path relative to a tree (bench/gpu_kv.py): each tree runs its own copy.
# ARGS may use {out} for that tree's output folder. Runs from /tmp so no source tree shadows the install.
set -uo pipefail
PY=${PYTHON:-python3}  # the interpreter that has torch
out=$1 wheels=$2
shift 2
trees=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do trees+=("$(cd "$1" && pwd)") || exit 2; shift; done
[ $# -gt 0 ] && shift
script=$1
shift
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ab/deps \
  "$wheels"/*.whl || exit 1
# xxhash.h for kvfs._xxh3_simd (the AVX2/AVX-512 XXH3), where the host lacks libxxhash-dev: the deb that
# bench/xxh3_fetch.sh put into this checkout's .xxhbuild/, unpacked once (trees without it ignore the variable).
xxh_deb=$(ls "$(dirname "$0")"/../.xxhbuild/libxxhash-dev_*.deb 2>/dev/null | head -1)
if [ -z "${KVFS_XXHASH_INCLUDE:-}" ] && [ ! -e /usr/include/xxhash.h ] && [ -n "$xxh_deb" ]; then
  mkdir -p /tmp/ab/xxhash && dpkg -x "$xxh_deb" /tmp/ab/xxhash && export KVFS_XXHASH_INCLUDE=/tmp/ab/xxhash/usr/include
fi
for tree in "${trees[@]}"; do
  name=$(basename "$tree")
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
    --target "/tmp/ab/$name" "$tree" || exit 1
done
for tree in "${trees[@]}"; do
  name=$(basename "$tree")
  mkdir -p "$out/$name"
  args=("${@//\{out\}/$out/$name}")
  echo "=== $name: $script ${args[*]}"
  # PYSPY="-r 500 --native": the benchmark runs under py-spy record (a wheel in WHEELS), raw stacks in
  # OUT/<name>/profile.txt (bench/profile_top.py summarises them).
  spy=()
  [ -n "${PYSPY:-}" ] && spy=(/tmp/ab/deps/bin/py-spy record $PYSPY -f raw -o "$out/$name/profile.txt" --)
  (cd /tmp && PYTHONPATH="/tmp/ab/$name:/tmp/ab/deps" PATH="/tmp/ab/deps/bin:$PATH" PYTHONUNBUFFERED=1 \
    "${spy[@]}" "$PY" "$tree/$script" "${args[@]}" 2>&1 | tee "$out/$name/stdout.txt" | tail -25)
done
