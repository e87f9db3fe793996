"""S3 plumbing for the model mirror: a client with bounded retries, error messages, parallel download.

Downloads use ranged GETs on a fixed pool of threads with *range splitting*: each file starts
as one stream; a thread that runs out of queued work splits the largest in-flight range in half
and takes the second half. Every thread stays busy until the end (no slow single-stream tail),
big files are fetched as parallel byte ranges, and the number of requests stays small (servers
like moto re-read the whole object per request; real S3 bills per request). Memory is bounded by
threads x chunk size: bytes go from the socket straight to ``os.pwrite`` in the temp file.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import random
import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import boto3
import botocore.exceptions as bce
import urllib3.exceptions
from botocore import UNSIGNED
from botocore.config import Config

from rayllm_app.config.s3_config import S3MirrorConfig

log = logging.getLogger("rayllm_app.storage.s3_mirror")
T = TypeVar("T")

CHUNK_BYTES = 1 << 20  # one socket read / pwrite; memory is ~threads x this
MIN_SPLIT_BYTES = 64 << 20  # halves never smaller: each extra request costs a round trip (and moto a full read)
_RETRYABLE = (
    bce.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ...
    bce.HTTPClientError,
    bce.IncompleteReadError,
    bce.ResponseStreamingError,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    ConnectionError,
    socket.timeout,
)
_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                   "ServiceUnavailable", "RequestLimitExceeded"}
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
               "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem", "InvalidSecurity", "Forbidden", "403"}
_REGION_CODES = {"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException", "301"}


class S3MirrorError(Exception):
    """A model cannot be mirrored from S3; the message says what to fix. ``reason`` is a stable tag."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across Ray task boundaries
        return (S3MirrorError, (self.reason, str(self)))


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, bce.ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or error.get("Code") in _THROTTLE_CODES
    return isinstance(exc, _RETRYABLE)


_retry_log_lock = threading.Lock()
_retry_log_at = 0.0


class RetryClock:
    """Exponential backoff with jitter, given up once failures have lasted ``budget_s`` in a row."""

    def __init__(self, budget_s: float, what: str) -> None:
        self.budget_s, self.what = budget_s, what
        self.attempt, self.first_failure = 0, 0.0

    def reset(self) -> None:
        self.attempt = 0

    def wait_or_raise(self, exc: BaseException) -> None:
        """Sleep before the next attempt, or re-raise ``exc`` if it is permanent or the budget is spent."""
        global _retry_log_at
        now = time.monotonic()
        if self.attempt == 0:
            self.first_failure = now
        delay = min(8.0, 0.25 * 2**self.attempt) * random.uniform(0.5, 1.0)
        if not _is_retryable(exc) or now + delay - self.first_failure > self.budget_s:
            raise exc
        self.attempt += 1
        with _retry_log_lock:  # one warning per few seconds, not one per thread and attempt
            if now - _retry_log_at > 5:
                _retry_log_at = now
                log.warning("S3 %s failed (%s); retrying for up to %.0f s", self.what, type(exc).__name__, self.budget_s)
        time.sleep(delay)


def with_retries(fn: Callable[[], T], budget_s: float, what: str) -> T:
    clock = RetryClock(budget_s, what)
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified by wait_or_raise
            clock.wait_or_raise(exc)


def resolve_endpoint(config: S3MirrorConfig) -> str | None:
    return config.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


class S3Client:
    """A boto3 S3 client plus what every error message needs: endpoint, retry budget, redaction."""

    def __init__(self, config: S3MirrorConfig, pool_size: int) -> None:
        self.config = config
        self.endpoint = resolve_endpoint(config)
        session = boto3.session.Session(region_name=config.region)
        self._secrets: list[str] = []
        if not config.anonymous:
            credentials = session.get_credentials()
            if credentials is None:
                raise S3MirrorError(
                    "no_credentials",
                    f"no AWS credentials found for {config.bucket_uri}: set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY, AWS_PROFILE (~/.aws/credentials), or run with an IAM role; "
                    "for a public bucket set anonymous: true in s3_mirror_config",
                )
            frozen = credentials.get_frozen_credentials()
            self._secrets = [s for s in (frozen.secret_key, frozen.token, frozen.access_key) if s]
        budget = config.retry_timeout_s
        self.raw = session.client(
            "s3",
            endpoint_url=self.endpoint,
            config=Config(
                signature_version=UNSIGNED if config.anonymous else None,
                connect_timeout=min(5.0, budget),
                read_timeout=min(20.0, max(budget, 5.0)),
                retries={"mode": "standard", "total_max_attempts": 1},  # RetryClock retries, with a deadline
                max_pool_connections=pool_size,
                s3={"addressing_style": config.addressing_style},
                response_checksum_validation="when_required",  # ranged GETs carry no checksum
                request_checksum_calculation="when_required",
                tcp_keepalive=True,
            ),
        )

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return re.sub(r"(://)[^/@\s]+@", r"\1***@", text)

    def call(self, what: str, operation: str, **kwargs: Any) -> Any:
        """One API call with bounded retries; any failure becomes an S3MirrorError."""
        try:
            return with_retries(lambda: getattr(self.raw, operation)(**kwargs), self.config.retry_timeout_s, what)
        except S3MirrorError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self.error(exc, what) from exc

    def error(self, exc: BaseException, what: str) -> S3MirrorError:
        """Turn a botocore/network failure into a message that says what to check next."""
        where = f"endpoint {self.endpoint}" if self.endpoint else "AWS S3"
        bucket = self.config.bucket
        if isinstance(exc, S3MirrorError):
            return exc
        if isinstance(exc, (bce.NoCredentialsError, bce.PartialCredentialsError)):
            return S3MirrorError("no_credentials", self.redact(f"{what}: incomplete AWS credentials ({exc})"))
        if isinstance(exc, bce.ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "?"))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            detail = f"{code}, HTTP {status}: {error.get('Message', '')}".rstrip(": ")
            if code == "NoSuchBucket":
                return S3MirrorError("no_such_bucket", self.redact(
                    f"{what}: bucket {bucket!r} does not exist at {where} ({detail}). Check bucket_uri, "
                    "and endpoint_url / AWS_ENDPOINT_URL_S3 if the bucket lives on another server"))
            if code in _AUTH_CODES or status == 403:
                return S3MirrorError("access_denied", self.redact(
                    f"{what}: access denied by {where} ({detail}). The credentials from the AWS chain "
                    "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the node's IAM role) were "
                    f"rejected or lack s3:ListBucket on arn:aws:s3:::{bucket} and s3:GetObject on its "
                    "objects; fix the credentials or the bucket policy, or set anonymous: true for a "
                    "public bucket"))
            if code in _REGION_CODES or status == 301:
                return S3MirrorError("wrong_region", self.redact(
                    f"{what}: bucket {bucket!r} is in another region ({detail}); set region in s3_mirror_config"))
            if code in ("PreconditionFailed", "InvalidRange") or status in (412, 416):
                return S3MirrorError("changed", self.redact(
                    f"{what}: the object changed while it was being downloaded ({detail}); retry to "
                    "mirror the new version"))
            if code == "InvalidObjectState":
                return S3MirrorError("archived", self.redact(
                    f"{what}: the object is in an archive storage class ({detail}); restore it (or copy it "
                    "to STANDARD) before mirroring"))
            if code in ("NoSuchKey", "404") or status == 404:
                return S3MirrorError("changed", self.redact(
                    f"{what}: the object disappeared after listing ({detail}); retry once the upload to "
                    f"{self.config.bucket_uri} is finished"))
            return S3MirrorError("s3_error", self.redact(f"{what}: S3 error from {where} ({detail})"))
        if _is_retryable(exc):
            return S3MirrorError("unreachable", self.redact(
                f"{what}: cannot reach S3 at {where} ({type(exc).__name__}: {exc}), gave up after "
                f"retrying for {self.config.retry_timeout_s:.0f} s. Check endpoint_url / AWS_ENDPOINT_URL_S3, "
                "the network and proxy settings, and that the server is up; raise retry_timeout_s for "
                "slow or flaky links"))
        return S3MirrorError("failed", self.redact(f"{what}: {type(exc).__name__}: {exc}"))


@dataclass(eq=False)
class RemoteFile:
    """One object to fetch to ``dest``; runtime fields are guarded by the transfer's lock."""

    bucket: str
    key: str
    size: int
    etag: str
    dest: Path
    remaining: int = field(init=False)
    fd: int = field(default=-1, init=False)
    etag_is_md5: bool = field(init=False)
    md5_comparable: bool = field(default=True, init=False)  # False for KMS/SSE-C: ETag is not the MD5
    done: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.remaining = self.size
        self.etag = self.etag.strip('"')
        # Multipart ETags ("<md5 of md5s>-<parts>") are not a checksum of the content: size only.
        self.etag_is_md5 = bool(re.fullmatch(r"[0-9a-f]{32}", self.etag))

    @property
    def temp(self) -> Path:
        return self.dest.with_name(f".{self.dest.name}.s3-partial")

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(eq=False)
class _Range:
    file: RemoteFile
    pos: int  # next byte to write
    end: int  # exclusive; lowered when another thread takes the second half
    reserved: int = 0  # end of the chunk being read now: a split never starts below it


class Progress:
    """Counts bytes and logs one line every few seconds (interval grows for long downloads)."""

    def __init__(self, label: str, total_bytes: int, total_files: int) -> None:
        self.label, self.total_bytes, self.total_files = label, total_bytes, total_files
        self.bytes = self.files = 0
        self.started = time.monotonic()
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._report, name="s3-mirror-progress", daemon=True)

    def add(self, nbytes: int = 0, files: int = 0) -> None:
        with self._lock:
            self.bytes += nbytes
            self.files += files

    def rate(self) -> float:
        return self.bytes / max(time.monotonic() - self.started, 1e-6)

    def line(self) -> str:
        rate = self.rate()
        eta = (self.total_bytes - self.bytes) / rate if rate > 0 else float("inf")
        pct = 100 * self.bytes / max(self.total_bytes, 1)
        return (f"{self.label}: {self.bytes / 2**20:.0f}/{self.total_bytes / 2**20:.0f} MiB ({pct:.0f}%), "
                f"{rate / 1e6:.0f} MB/s, ETA {eta:.0f} s, {self.files}/{self.total_files} files")

    def _report(self) -> None:
        while not self._stop.wait(min(30.0, max(5.0, (time.monotonic() - self.started) / 10))):
            log.info("%s", self.line())

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(4 << 20):
            digest.update(block)
    return digest.hexdigest()


class Transfer:
    """Downloads ``files`` to their ``dest`` with ``threads`` parallel range streams."""

    def __init__(self, s3: S3Client, files: list[RemoteFile], progress: Progress, threads: int) -> None:
        self.s3, self.files, self.progress, self.threads = s3, files, progress, threads
        self._lock = threading.Lock()
        self._pending = deque(_Range(f, 0, f.size) for f in files)
        self._active: set[_Range] = set()
        self._error: BaseException | None = None
        self.requests = 0

    def run(self) -> None:
        workers = [threading.Thread(target=self._worker, name=f"s3-mirror-{i}", daemon=True)
                   for i in range(min(self.threads, len(self._pending)))]
        try:
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        except BaseException as exc:  # e.g. KeyboardInterrupt: stop the workers at their next chunk
            with self._lock:
                self._error = self._error or exc
            for w in workers:
                if w.ident is not None:
                    w.join()  # before closing their files below
            raise
        finally:
            if self._error is not None:
                self._discard_partials()
        if self._error is not None:
            raise self._error

    def _worker(self) -> None:
        while True:
            with self._lock:
                if self._error is not None:
                    return
                rng = self._pending.popleft() if self._pending else self._split()
                if rng is None:
                    return
                self._active.add(rng)
            try:
                self._fetch(rng)
            except BaseException as exc:  # noqa: BLE001 - handed to run()
                with self._lock:
                    self._error = self._error or self._describe(exc, rng.file)
                return
            finally:
                with self._lock:
                    self._active.discard(rng)

    def _describe(self, exc: BaseException, f: RemoteFile) -> BaseException:
        if isinstance(exc, OSError) and not _is_retryable(exc):
            return S3MirrorError("local_io", f"writing {f.dest} failed ({exc}); check free space and "
                                 "permissions of the cache directory (RAYLLM_CACHE_DIR)")
        return self.s3.error(exc, f"downloading {f.uri}")

    def _split(self) -> _Range | None:
        """Take the second half of the largest in-flight range (caller holds the lock)."""
        victim = max(self._active, key=lambda r: r.end - max(r.pos, r.reserved), default=None)
        if victim is None:
            return None
        start = max(victim.pos, victim.reserved)
        if victim.end - start < 2 * MIN_SPLIT_BYTES:
            return None
        middle = start + (victim.end - start) // 2
        stolen = _Range(victim.file, middle, victim.end)
        victim.end = middle
        return stolen

    def _fetch(self, rng: _Range) -> None:
        f = rng.file
        with self._lock:
            self._open(f)
        if f.size == 0:
            self._finish(f)
            return
        clock = RetryClock(self.s3.config.retry_timeout_s, f"download of {f.uri}")
        while True:
            with self._lock:
                start, end = rng.pos, rng.end
            if start >= end or self._error is not None:
                return
            with self._lock:
                self.requests += 1
            try:
                response = self.s3.raw.get_object(
                    Bucket=f.bucket, Key=f.key, Range=f"bytes={start}-{end - 1}", IfMatch=f'"{f.etag}"')
                self._check(f, start, response)
                self._stream(rng, response["Body"])
            except Exception as exc:  # noqa: BLE001
                if rng.pos > start:
                    clock.reset()  # bytes flowed: this is a new failure, not a continued outage
                clock.wait_or_raise(exc)

    def _check(self, f: RemoteFile, start: int, response: dict[str, Any]) -> None:
        """The body must be the bytes we asked for, of the object version we listed."""
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", str(response.get("ContentRange", "")))
        if match is None and start != 0 or match is not None and int(match[1]) != start:
            raise S3MirrorError("no_ranges", f"{f.uri}: the server did not honour the byte range {start}-; "
                                "this server ignores Range requests, so set max_concurrency: 1 (one stream per file)")
        if match is not None and match[2].isdigit() and int(match[2]) != f.size:
            raise S3MirrorError("changed", f"{f.uri} is now {match[2]} bytes, listed as {f.size}; retry to "
                                "mirror the new version")
        if str(response.get("ServerSideEncryption", "")).startswith("aws:kms") or response.get("SSECustomerAlgorithm"):
            f.md5_comparable = False

    def _stream(self, rng: _Range, body: Any) -> None:
        f = rng.file
        try:
            while True:
                with self._lock:
                    n = min(CHUNK_BYTES, rng.end - rng.pos)
                    if n <= 0 or self._error is not None:
                        return  # done, split off, or cancelled: close() drops the connection
                    rng.reserved = rng.pos + n
                data = body.read(n)
                if not data:
                    raise bce.IncompleteReadError(actual_bytes=rng.pos, expected_bytes=rng.end)
                _write_at(f.fd, data, rng.pos)
                with self._lock:
                    rng.pos += len(data)
                    f.remaining -= len(data)
                    finished = f.remaining == 0
                self.progress.add(len(data))
                if finished:
                    self._finish(f)
        finally:
            body.close()

    def _open(self, f: RemoteFile) -> None:
        if f.fd < 0 and not f.done:
            f.dest.parent.mkdir(parents=True, exist_ok=True)
            f.fd = os.open(f.temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(f.fd, f.size)

    def _finish(self, f: RemoteFile) -> None:
        """Verify, make durable and publish one file under its final name (atomically)."""
        os.fsync(f.fd)
        size = os.fstat(f.fd).st_size
        os.close(f.fd)
        f.fd = -1
        if size != f.size:
            raise S3MirrorError("corrupt", f"{f.uri}: wrote {size} bytes, expected {f.size}; retry")
        if self.s3.config.verify_checksums and f.etag_is_md5 and f.md5_comparable:
            actual = _md5_of(f.temp)
            if actual != f.etag:
                f.temp.unlink(missing_ok=True)
                raise S3MirrorError("corrupt", f"{f.uri}: MD5 {actual} of the download does not match ETag "
                                    f"{f.etag}; retry, or set verify_checksums: false if this server's ETags "
                                    "are not MD5 digests")
        os.replace(f.temp, f.dest)
        f.done = True
        self.progress.add(files=1)

    def _discard_partials(self) -> None:
        for f in self.files:
            if f.fd >= 0:
                os.close(f.fd)
                f.fd = -1
            if not f.done:
                f.temp.unlink(missing_ok=True)
