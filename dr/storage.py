"""Remote storage of reinforced data: the one place every reader calls for ``s3://`` and ``http(s)://`` URLs.

* ``s3://bucket/key`` goes through ``boto3`` (AWS's maintained SDK): credentials and endpoints come the standard way
  (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_PROFILE``, ``~/.aws/config``; ``AWS_ENDPOINT_URL_S3`` or
  ``AWS_ENDPOINT_URL`` for an S3-compatible store). Nothing here logs or stores a credential.
* ``http(s)://`` goes through the standard library (``urllib``), no extra package.

Both are registered with WebDataset's URL dispatch (``webdataset.gopen.gopen_schemes``), so ``wds.gopen(url)`` (what
the training loader calls for every shard) streams the bytes into the same tar reader as a local file.

Every call is bounded: connect/read timeouts (``DR_STORAGE_TIMEOUT`` seconds, default 20) and at most
``DR_STORAGE_RETRIES`` (default 4) tries with exponential backoff for transient errors (connection refused/reset,
timeouts, 5xx, throttling), each retry logged. A stream cut short in transit is resumed with a ``Range`` request
within the same budget. A missing bucket or key, a 403 and an exhausted budget raise :class:`StorageError` (a
``ValueError``: the scripts print ``error:`` and exit 2) naming the URL.
"""
import contextlib
import http.client
import importlib
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import webdataset  # noqa: F401 (loads webdataset.gopen, whose name the package rebinds to the function)

_logger = logging.getLogger(__name__)

REMOTE_SCHEMES = ('s3', 'http', 'https')
_PERMANENT_S3 = {'NoSuchBucket', 'NoSuchKey', 'AccessDenied', 'InvalidAccessKeyId', 'SignatureDoesNotMatch',
                 'AllAccessDisabled', 'InvalidBucketName', '403', '404', '400', '401'}


class StorageError(ValueError):
    """A remote object that cannot be read; the message names the URL."""


def is_remote(url: str) -> bool:
    """Whether ``url`` is an ``s3://``, ``http://`` or ``https://`` URL."""
    return str(url).split('://', 1)[0].lower() in REMOTE_SCHEMES and '://' in str(url)


def join(folder: str, name: str) -> str:
    """``name`` inside a folder URL (``s3://b/prefix/`` + ``x.tar`` -> ``s3://b/prefix/x.tar``)."""
    return f'{folder.rstrip("/")}/{name}'


def absolute(path: str) -> str:
    """How outputs name a folder or file: a URL as given, a local path made absolute."""
    return path if is_remote(path) else os.path.abspath(path)


def split_s3(url: str) -> Tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    rest = url[len('s3://'):]
    bucket, _, key = rest.partition('/')
    if not bucket:
        raise StorageError(f'{url}: no bucket in the S3 URL (expected s3://bucket/prefix/...)')
    return bucket, key


def timeout() -> float:
    return float(os.environ.get('DR_STORAGE_TIMEOUT', '20'))


def retries() -> int:
    return max(1, int(os.environ.get('DR_STORAGE_RETRIES', '4')))


_clients: Dict[Tuple[int, Optional[str]], Any] = {}


def s3_client() -> Any:
    """A boto3 S3 client of this process (clients are not fork-safe: one per pid), with bounded timeouts and
    botocore's own retries off (:func:`with_retries` retries, and logs it)."""
    endpoint = os.environ.get('AWS_ENDPOINT_URL_S3') or os.environ.get('AWS_ENDPOINT_URL')
    cache_key = (os.getpid(), endpoint)
    if cache_key not in _clients:
        import boto3
        from botocore.config import Config
        # checksums only where S3 requires them: S3-compatible stores often reject the newer default CRC headers,
        # and the body is then streamed once (not read ahead to checksum it)
        config = Config(connect_timeout=timeout(), read_timeout=timeout(), retries={'total_max_attempts': 1},
                        request_checksum_calculation='when_required', response_checksum_validation='when_required')
        _clients[cache_key] = boto3.session.Session().client('s3', endpoint_url=endpoint, config=config)
    return _clients[cache_key]


def _transient(exn: BaseException) -> bool:
    """Whether ``exn`` may go away on a retry."""
    try:
        from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, ReadTimeoutError
    except ImportError:  # boto3 not installed: only HTTP errors occur
        ClientError = ConnectionError = HTTPClientError = ReadTimeoutError = ()  # noqa: N806
    if isinstance(exn, urllib.error.HTTPError):
        return exn.code >= 500 or exn.code == 429
    if ClientError and isinstance(exn, ClientError):
        code = str(exn.response.get('Error', {}).get('Code', ''))
        status = int(exn.response.get('ResponseMetadata', {}).get('HTTPStatusCode', 0) or 0)
        return code not in _PERMANENT_S3 and (status >= 500 or status == 429 or code in ('SlowDown', 'Throttling'))
    transient = (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError,
                 ConnectionResetError, ConnectionRefusedError)
    if ConnectionError:
        transient += (ConnectionError, HTTPClientError, ReadTimeoutError)
    return isinstance(exn, transient)


def _describe(exn: BaseException) -> str:
    if isinstance(exn, urllib.error.HTTPError):
        return f'HTTP {exn.code} {exn.reason}'
    response = getattr(exn, 'response', None)
    if isinstance(response, dict) and 'Error' in response:
        status = response.get('ResponseMetadata', {}).get('HTTPStatusCode')
        return f'HTTP {status} {response["Error"].get("Code")}: {response["Error"].get("Message", "")}'.strip()
    return f'{type(exn).__name__}: {exn}'


def with_retries(what: str, url: str, call: Callable[[], Any]) -> Any:
    """``call()`` with up to :func:`retries` tries and exponential backoff (0.25 s, 0.5 s, ...) for transient
    errors, each retry logged; the last error (or a permanent one) raises :class:`StorageError` naming ``url``."""
    attempts = retries()
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except StorageError:
            raise
        except Exception as e:  # classified below: only transient errors are retried
            if not _transient(e) or attempt == attempts:
                tried = f' after {attempt} tries' if attempt > 1 else ''
                raise StorageError(f'{url}: cannot {what}{tried} ({_describe(e)})') from e
            delay = 0.25 * 2 ** (attempt - 1)
            _logger.warning(f'{url}: {what} failed ({_describe(e)}); retry {attempt}/{attempts - 1} in {delay:.2f} s')
            time.sleep(delay)
    raise AssertionError('unreachable')


def _open_raw(url: str, start: int, end: Optional[int] = None) -> Tuple[Any, Optional[int]]:
    """(binary stream of bytes ``start``..``end`` (inclusive; None: to the end of the object), the offset where the
    stream ends or None). A server that ignores the ``Range`` request raises :class:`StorageError`."""
    ranged = f'bytes={start}-{"" if end is None else end}' if start or end is not None else None
    if url.startswith('s3://'):
        bucket, key = split_s3(url)
        response = s3_client().get_object(Bucket=bucket, Key=key, **({'Range': ranged} if ranged else {}))
        return response['Body'], start + int(response['ContentLength'])
    request = urllib.request.Request(url, headers={'Range': ranged} if ranged else {})
    response = urllib.request.urlopen(request, timeout=timeout())
    if ranged and response.status != 206:
        response.close()
        if end is None:
            raise StorageError(f'{url}: transfer cut short at byte {start} and the server ignores Range requests '
                               f'(cannot resume)')
        raise StorageError(f'{url}: the server ignores Range requests (HTTP {response.status}): random access '
                           f'(+mix partners) needs a server that answers Range with 206')
    length = response.headers.get('Content-Length')
    return response, (start + int(length)) if length is not None else None


class RemoteReader:
    """A read-only, non-seekable binary stream of a remote object; a transfer cut short (or one that ends before
    its announced length) is resumed from where it stopped, within the retry budget."""

    def __init__(self, url: str):
        self.url = url
        self.offset = 0
        self.failures = 0
        self._stream, self.size = with_retries('open', url, lambda: _open_raw(url, 0))

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return True

    def _reopen(self, exn: BaseException) -> None:
        self.failures += 1
        if self.failures >= retries():
            raise StorageError(f'{self.url}: transfer cut short at byte {self.offset} of {self.size} after '
                               f'{self.failures} tries ({_describe(exn)})') from exn
        delay = 0.25 * 2 ** (self.failures - 1)
        _logger.warning(f'{self.url}: transfer cut short at byte {self.offset} ({_describe(exn)}); resuming '
                        f'(retry {self.failures}/{retries() - 1}) in {delay:.2f} s')
        time.sleep(delay)
        self.close()
        self._stream, _ = with_retries('reopen', self.url, lambda: _open_raw(self.url, self.offset))

    def read(self, n: int = -1) -> bytes:
        parts = []
        want = n if n is not None and n >= 0 else None
        while True:
            try:
                data = self._stream.read(want) if want is not None else self._stream.read()
            except Exception as e:  # a reset connection, a read timeout, an IncompleteRead: resume
                if not _transient(e) and not isinstance(e, (OSError, http.client.HTTPException)):
                    raise StorageError(f'{self.url}: read failed at byte {self.offset} ({_describe(e)})') from e
                self._reopen(e)
                continue
            self.offset += len(data)
            parts.append(data)
            if want is not None:
                want -= len(data)
            done = want == 0 or (self.size is not None and self.offset >= self.size)
            if done or (not data and self.size is None):
                return b''.join(parts)
            if not data:  # the server closed before the announced length
                self._reopen(EOFError(f'stream ended at byte {self.offset}, {self.size} announced'))

    def close(self) -> None:
        stream, self._stream = getattr(self, '_stream', None), None
        if stream is not None:
            try:
                stream.close()
            except Exception:  # a connection closed early may complain; nothing more is read
                pass

    def __enter__(self) -> 'RemoteReader':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_read(url: str) -> RemoteReader:
    """Stream a remote object (raises :class:`StorageError` naming ``url``)."""
    return RemoteReader(url)


def read_bytes(url: str) -> bytes:
    """The whole remote object."""
    with open_read(url) as f:
        return f.read()


def read_range(url: str, offset: int, length: int) -> bytes:
    """``length`` bytes of a remote object from byte ``offset`` (S3 ``Range`` GET, HTTP ``Range`` request), bounded
    and retried like every call here; a server that ignores ``Range`` (answers 200) raises :class:`StorageError`."""
    if length <= 0:
        return b''

    def get() -> bytes:
        body, _ = _open_raw(url, offset, offset + length - 1)
        try:
            data = body.read()
        except Exception as e:  # a reset connection or a read timeout mid-body: retried
            raise ConnectionResetError(f'body read failed ({_describe(e)})') from e
        finally:
            body.close()
        if len(data) != length:
            raise ConnectionResetError(f'{len(data)} of {length} bytes at byte {offset}')
        return data
    return with_retries(f'read bytes {offset}..{offset + length - 1} of', url, get)


def size(url: str) -> int:
    """The size of a remote object in bytes (HEAD)."""
    def head() -> int:
        if url.startswith('s3://'):
            bucket, key = split_s3(url)
            return int(s3_client().head_object(Bucket=bucket, Key=key)['ContentLength'])
        request = urllib.request.Request(url, method='HEAD')
        with urllib.request.urlopen(request, timeout=timeout()) as response:
            length = response.headers.get('Content-Length')
        if length is None:
            raise StorageError(f'{url}: the server gives no Content-Length')
        return int(length)
    return with_retries('get the size of', url, head)


def list_sizes(prefix_url: str) -> Dict[str, int]:
    """``{name: bytes}`` of the objects directly under ``s3://bucket/prefix/`` (HTTP cannot list)."""
    if not prefix_url.startswith('s3://'):
        raise StorageError(f'{prefix_url}: only s3:// folders can be listed (and written)')
    bucket, prefix = split_s3(prefix_url.rstrip('/') + '/')

    def listing() -> Dict[str, int]:
        out: Dict[str, int] = {}
        pages = s3_client().get_paginator('list_objects_v2').paginate(Bucket=bucket, Prefix=prefix, Delimiter='/')
        for page in pages:
            for obj in page.get('Contents', []):
                out[obj['Key'][len(prefix):]] = int(obj['Size'])
        return out
    return with_retries('list', prefix_url, listing)


UPLOAD_CRASH_ENV = 'DR_STORAGE_CRASH_MID_UPLOAD'  # test hook: die (os._exit) after this many bytes of an upload


def upload_file(path: str, url: str) -> None:
    """Upload local file ``path`` to ``s3://bucket/key``. An S3 object appears under its name only once its upload
    completed (single PUT or completed multipart upload), so a killed upload leaves nothing under ``url``."""
    bucket, key = split_s3(url)
    crash_after = os.environ.get(UPLOAD_CRASH_ENV)
    if crash_after is not None:  # the test hook: the process dies while the request body is being sent
        with open(path, 'rb') as f:
            body = _DyingReader(f, int(crash_after))
            s3_client().put_object(Bucket=bucket, Key=key, Body=body, ContentLength=os.path.getsize(path))
        return
    with_retries('upload to', url, lambda: s3_client().upload_file(path, bucket, key))


class _DyingReader:
    """A file whose reader dies (``os._exit(17)``) once ``limit`` bytes were read (:data:`UPLOAD_CRASH_ENV`)."""

    def __init__(self, f: Any, limit: int):
        self.f, self.limit, self.sent = f, limit, 0

    def read(self, n: int = -1) -> bytes:
        if self.sent >= self.limit:
            os._exit(17)
        data = self.f.read(min(n, self.limit - self.sent + 1) if n and n > 0 else self.limit - self.sent + 1)
        self.sent += len(data)
        return data

    def seek(self, *args: Any) -> int:
        return self.f.seek(*args)

    def tell(self) -> int:
        return self.f.tell()


def put_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to ``url``: a local temporary file, uploaded when complete (:func:`upload_file`)."""
    import tempfile
    with tempfile.NamedTemporaryFile(prefix='.dr-upload-', suffix='.tmp') as f:
        f.write(data)
        f.flush()
        upload_file(f.name, url)


@contextlib.contextmanager
def fetched(url: str) -> Iterator[str]:
    """Download ``url`` to a local temporary file (streamed, 1 MiB at a time); yields its path, removed after."""
    import tempfile
    with tempfile.NamedTemporaryFile(prefix='.dr-fetch-', suffix='.tmp') as f, open_read(url) as stream:
        while True:
            chunk = stream.read(1 << 20)
            if not chunk:
                break
            f.write(chunk)
        f.flush()
        yield f.name


def _gopen_remote(url: str, mode: str = 'rb', bufsize: int = 8192, **kw: Any) -> RemoteReader:
    if mode != 'rb':
        raise ValueError(f'{url}: remote URLs are opened for reading only here (mode {mode!r})')
    return open_read(url)


def register_with_webdataset() -> None:
    """Route WebDataset's ``gopen`` for ``s3://`` and ``http(s)://`` through :func:`open_read` (bounded, retried,
    errors naming the URL) instead of its ``curl``/``s3cmd`` pipes."""
    schemes = importlib.import_module('webdataset.gopen').gopen_schemes
    for scheme in REMOTE_SCHEMES:
        schemes[scheme] = _gopen_remote


register_with_webdataset()
