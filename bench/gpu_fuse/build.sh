#!/bin/sh
# Build pyfuse3 into /tmp/site on the GPU host from carried libfuse3 debs + sdist (see docs/benchmarks.md).
set -e
export FUSE_ROOT=/tmp/fuse
mkdir -p $FUSE_ROOT /tmp/bt
for f in .fusebuild/*.deb; do dpkg -x $f $FUSE_ROOT; done
python3 -m pip install -q --no-index --no-deps --target /tmp/bt .fusebuild/*.whl
PATH=$PWD/.fusebuild/bin:$PATH PYTHONPATH=/tmp/bt:/tmp/site python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .fusebuild/pyfuse3-3.5.0.tar.gz
cp "$(find $FUSE_ROOT -name fusermount3 -type f | head -1)" /usr/local/bin/
PYTHONPATH=/tmp/site python3 -c "import pyfuse3; print('pyfuse3', pyfuse3.__version__, 'libfuse', pyfuse3.__file__)"
