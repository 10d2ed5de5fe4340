#!/bin/sh
# Run here (a Debian machine with the package registries): gather what building pyfuse3 on the GPU host
# needs into .fusebuild/ (ignored by git; carry it with the device tool). See docs/benchmarks.md.
set -e
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.fusebuild/' .git/info/exclude || echo /.fusebuild/ >> .git/info/exclude
mkdir -p .fusebuild/bin && cd .fusebuild
apt-get download libfuse3-3 libfuse3-dev fuse3
python3 -m pip download --no-deps --no-binary :all: -d . pyfuse3==3.5.0
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d . \
    "setuptools>=78.1.1" setuptools_scm "vcs-versioning>=2.5,<3" "packaging>=26.2"
cp ../bench/gpu_fuse/pkg-config ../bench/gpu_fuse/build.sh .
mv pkg-config bin/
