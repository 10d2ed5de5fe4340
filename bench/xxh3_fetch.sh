#!/bin/sh
# Run here (a Debian machine with the package registries): put Debian's libxxhash-dev deb into
# .xxhbuild/ (ignored by git; carry it to the GPU host with the checkout). It holds xxhash.h, which
# kvfs._xxh3_simd (the AVX2/AVX-512 XXH3) is built from; bench/device_ab.sh unpacks it there and points
# the build at it with KVFS_XXHASH_INCLUDE. By hand on the host:
#   dpkg -x .xxhbuild/libxxhash-dev_*.deb /tmp/xxh
#   KVFS_XXHASH_INCLUDE=/tmp/xxh/usr/include pip install --no-deps --no-build-isolation --target /tmp/site .
set -e
cd "$(git rev-parse --show-toplevel)"
mkdir -p .xxhbuild && cd .xxhbuild
apt-get download libxxhash-dev
