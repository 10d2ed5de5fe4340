"""S3-compatible object storage through boto3.

Endpoint, region and credentials come from the standard AWS sources (``AWS_ENDPOINT_URL``,
``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``..., ``AWS_PROFILE``, ~/.aws); nothing
kvfs-specific. Every request runs under explicit connect/read timeouts and a bounded retry count.
Large objects are written with multipart upload, parts sent in parallel.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from urllib.parse import urlparse

from botocore.exceptions import BotoCoreError, ClientError

from kvfs.errors import error
from kvfs.remote.store import RemoteEntry, join_key

log = logging.getLogger("kvfs.remote")

PART_SIZE = 16 << 20  # multipart part size (S3 minimum is 5 MiB)
PARALLEL_PARTS = 4

# What boto3 raises: service errors, transport errors (wrapped by botocore), and plain OSErrors.
BOTO_ERRORS = (ClientError, BotoCoreError, OSError)

# S3 error codes -> errno, in one table (everything else is EIO).
_CODES = {
    "NoSuchKey": errno.ENOENT, "NoSuchBucket": errno.ENOENT, "404": errno.ENOENT, "NotFound": errno.ENOENT,
    "AccessDenied": errno.EACCES, "403": errno.EACCES, "InvalidAccessKeyId": errno.EACCES,
    "SignatureDoesNotMatch": errno.EACCES, "ExpiredToken": errno.EACCES,
    "PreconditionFailed": errno.ESTALE, "412": errno.ESTALE, "InvalidRange": errno.EINVAL,
}


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


class S3Store:
    def __init__(self, url: str):
        import boto3
        from botocore.config import Config

        parsed = urlparse(url)
        if not parsed.netloc:
            raise error(errno.EINVAL, f"{url}: expected s3://bucket[/prefix]")
        self.url = url
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        config = Config(
            connect_timeout=_env_float("KVFS_S3_CONNECT_TIMEOUT", 5.0),
            read_timeout=_env_float("KVFS_S3_READ_TIMEOUT", 30.0),
            retries={"max_attempts": int(_env_float("KVFS_S3_MAX_ATTEMPTS", 3)), "mode": "standard"},
            max_pool_connections=64,
        )
        self._s3 = boto3.session.Session().client("s3", config=config)

    def _key(self, key: str) -> str:
        return join_key(self.prefix, key)

    def _fail(self, exc: BaseException, what: str) -> OSError:
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            num = _CODES.get(code) or _CODES.get(status) or errno.EIO
            return error(num, f"s3://{self.bucket}/{what}: {code or status} {exc.response.get('Error', {}).get('Message', '')}".rstrip())
        if isinstance(exc, BotoCoreError):
            return error(errno.EIO, f"s3://{self.bucket}/{what}: {exc}")
        if isinstance(exc, OSError):
            return exc
        return error(errno.EIO, f"s3://{self.bucket}/{what}: {exc!r}")

    def check(self) -> None:
        try:
            self._s3.head_bucket(Bucket=self.bucket)
            self._s3.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except BOTO_ERRORS as exc:
            err = self._fail(exc, self.prefix)
            if err.errno == errno.ENOENT:
                raise error(errno.ENOENT, f"s3://{self.bucket}: no such bucket") from None
            raise err from None

    def list(self, prefix: str) -> Iterator[RemoteEntry]:
        full = self._key(prefix)
        full = full + "/" if full else ""
        token = None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": full, "Delimiter": "/", "MaxKeys": 1000}
            if token:
                kwargs["ContinuationToken"] = token
            try:
                page = self._s3.list_objects_v2(**kwargs)
            except BOTO_ERRORS as exc:
                raise self._fail(exc, full) from None
            for cp in page.get("CommonPrefixes", ()):
                name = cp["Prefix"][len(full):].strip("/")
                if name:
                    yield RemoteEntry(join_key(prefix, name), is_dir=True)
            for obj in page.get("Contents", ()):
                name = obj["Key"][len(full):]
                if not name or name.endswith("/"):
                    continue  # directory markers
                yield RemoteEntry(join_key(prefix, name), obj["Size"], obj["ETag"].strip('"'),
                                  int(obj["LastModified"].timestamp() * 1e9))
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def head(self, key: str) -> RemoteEntry:
        try:
            h = self._s3.head_object(Bucket=self.bucket, Key=self._key(key))
        except BOTO_ERRORS as exc:
            raise self._fail(exc, self._key(key)) from None
        return RemoteEntry(key, h["ContentLength"], h["ETag"].strip('"'), int(h["LastModified"].timestamp() * 1e9))

    def open_range(self, key: str, offset: int, length: int, etag: str = "") -> _S3Stream:
        kwargs = {"Bucket": self.bucket, "Key": self._key(key), "Range": f"bytes={offset}-{offset + max(length, 1) - 1}"}
        if etag:
            kwargs["IfMatch"] = f'"{etag}"'
        try:
            return _S3Stream(self, key, self._s3.get_object(**kwargs)["Body"])
        except BOTO_ERRORS as exc:
            raise self._fail(exc, self._key(key)) from None

    def begin_upload(self, key: str, size_hint: int = 0) -> _S3Upload:
        return _S3Upload(self, key)

    def delete(self, key: str) -> None:
        try:
            self._s3.delete_object(Bucket=self.bucket, Key=self._key(key))
        except BOTO_ERRORS as exc:
            err = self._fail(exc, self._key(key))
            if err.errno != errno.ENOENT:
                raise err from None


class _S3Stream:
    def __init__(self, store: S3Store, key: str, body) -> None:
        self.store, self.key, self.body = store, key, body

    def readinto(self, into: memoryview) -> int:
        try:
            return self.body.readinto(into)
        except BOTO_ERRORS as exc:  # read timeouts and dropped connections surface here
            raise self.store._fail(exc, self.store._key(self.key)) from None

    def close(self) -> None:
        self.body.close()


class _S3Upload:
    """Buffers writes into parts; small objects go up in one PUT, large ones as a parallel multipart."""

    def __init__(self, store: S3Store, key: str):
        self.store = store
        self.key = key
        self.buf = bytearray()
        self.size = 0
        self.upload_id: str | None = None
        self.parts: list[Future] = []
        self.pool: ThreadPoolExecutor | None = None
        self.slots = threading.Semaphore(PARALLEL_PARTS)

    def _start(self) -> None:
        s = self.store
        try:
            self.upload_id = s._s3.create_multipart_upload(Bucket=s.bucket, Key=s._key(self.key))["UploadId"]
        except BOTO_ERRORS as exc:
            raise s._fail(exc, s._key(self.key)) from None
        self.pool = ThreadPoolExecutor(PARALLEL_PARTS, thread_name_prefix="kvfs-s3-part")

    def _send_part(self, number: int, data: bytes) -> dict:
        s = self.store
        try:
            r = s._s3.upload_part(Bucket=s.bucket, Key=s._key(self.key), UploadId=self.upload_id, PartNumber=number,
                                  Body=data)
            return {"PartNumber": number, "ETag": r["ETag"]}
        finally:
            self.slots.release()

    def _flush_part(self) -> None:
        if self.upload_id is None:
            self._start()
        for f in self.parts:  # surface a failed part early
            if f.done() and f.exception() is not None:
                raise self.store._fail(f.exception(), self.store._key(self.key))  # type: ignore[arg-type]
        data, self.buf = bytes(self.buf[:PART_SIZE]), self.buf[PART_SIZE:]
        self.slots.acquire()
        assert self.pool is not None
        self.parts.append(self.pool.submit(self._send_part, len(self.parts) + 1, data))

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.buf += data
        self.size += len(data)
        while len(self.buf) >= 2 * PART_SIZE:  # keep the last part >= PART_SIZE as S3 requires
            self._flush_part()

    def complete(self) -> RemoteEntry:
        s = self.store
        try:
            if self.upload_id is None and len(self.buf) <= 2 * PART_SIZE:
                s._s3.put_object(Bucket=s.bucket, Key=s._key(self.key), Body=bytes(self.buf))
            else:
                while self.buf:
                    self._flush_part()
                parts = [f.result() for f in self.parts]
                s._s3.complete_multipart_upload(Bucket=s.bucket, Key=s._key(self.key), UploadId=self.upload_id,
                                                MultipartUpload={"Parts": parts})
        except OSError:
            self.abort()
            raise
        except BOTO_ERRORS as exc:
            self.abort()
            raise s._fail(exc, s._key(self.key)) from None
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)
        return s.head(self.key)

    def abort(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.upload_id is not None:
            s = self.store
            try:
                s._s3.abort_multipart_upload(Bucket=s.bucket, Key=s._key(self.key), UploadId=self.upload_id)
            except BOTO_ERRORS as exc:  # best effort: S3 lifecycle rules clean up abandoned uploads
                log.debug("aborting multipart upload of %s: %s", self.key, exc)
            self.upload_id = None
