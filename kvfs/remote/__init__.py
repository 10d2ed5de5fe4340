"""The remote capacity tier: S3 / HDFS / any pyarrow filesystem behind a kvfs directory.

Layout: ``store`` (the ``RemoteStore`` interface every backend implements), one file per backend
(``s3``, ``arrowfs``), ``fill`` (client-side read-through into chunkservers), ``cli`` (the
``kvfs remote|flush|warm|stat`` commands). The meta side (bindings, upload queue, uploader,
eviction) lives in ``kvfs.meta.remote``.
"""

from __future__ import annotations

import errno
from urllib.parse import urlparse

from kvfs.errors import error
from kvfs.remote.store import RemoteEntry as RemoteEntry
from kvfs.remote.store import RemoteStore as RemoteStore
from kvfs.remote.store import Upload as Upload

_cache: dict[str, RemoteStore] = {}


def open_store(url: str, *, cached: bool = True) -> RemoteStore:
    """The store for ``url``: ``s3://`` through boto3, anything else through pyarrow.fs.

    Error handling: EINVAL for a URL no backend understands.
    """
    if cached and url in _cache:
        return _cache[url]
    scheme = urlparse(url).scheme.lower()
    store: RemoteStore
    if scheme in ("s3", "s3a"):
        from kvfs.remote.s3 import S3Store

        store = S3Store(url)
    elif scheme in ("file", "hdfs", "viewfs", "gs", "gcs", "abfs", "abfss"):
        from kvfs.remote.arrowfs import ArrowStore

        store = ArrowStore(url)
    else:
        raise error(errno.EINVAL, f"{url}: unsupported remote URL (use s3://, hdfs://, file://, ...)")
    if cached:
        _cache[url] = store
    return store
