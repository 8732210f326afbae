"""Real servers on 127.0.0.1 for the remote-storage tests: moto's standalone S3 server and a plain HTTP file server.

moto (``moto[server]``) is the S3 emulation most used in Python projects and installs from PyPI with no binary; it
speaks the S3 REST protocol boto3 uses (ranges, listings, error codes NoSuchBucket/NoSuchKey). The HTTP server is
the standard library's ``http.server`` plus single-range ``Range: bytes=a-b`` requests (206, as nginx, S3 website
endpoints and CDNs answer them; ``http.server`` itself ignores Range) and three test hooks: paths under
``/forbidden/`` answer 403, paths under ``/cut/`` announce the file's full length but send only half of it (a shard
cut short in transit), and paths under ``/norange/`` ignore Range (a plain 200, like ``http.server``).
"""
import contextlib
import functools
import http.server
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Dict, Iterator

from dr import storage
from tests.helpers import free_port

# what every client of the local S3 emulator needs: no EC2 metadata lookups, no proxy for loopback
LOOPBACK_S3_ENV = {'AWS_DEFAULT_REGION': 'us-east-1', 'AWS_EC2_METADATA_DISABLED': 'true',
                   'NO_PROXY': '127.0.0.1,localhost', 'no_proxy': '127.0.0.1,localhost'}

READY_SECONDS = 30


def _wait_ready(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f'server for {url} exited with status {proc.returncode}')
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except (TimeoutError, OSError):
            time.sleep(0.2)
    raise RuntimeError(f'server {url} not ready within {READY_SECONDS} s')


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server on a free loopback port; yields its endpoint URL and stops it at the end."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, '-m', 'moto.server', '-H', '127.0.0.1', '-p', str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f'http://127.0.0.1:{port}'
    try:
        _wait_ready(endpoint, proc)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def moto_s3(env: Dict[str, str]) -> Iterator[str]:
    """:func:`moto_server` with ``env`` (dummy credentials) and ``AWS_ENDPOINT_URL_S3`` set in ``os.environ`` while
    it runs (child processes inherit them); the environment is restored at the end. Yields the endpoint URL."""
    saved = {k: os.environ.get(k) for k in (*env, 'AWS_ENDPOINT_URL_S3')}
    os.environ.update(env)
    try:
        with moto_server() as endpoint:
            os.environ['AWS_ENDPOINT_URL_S3'] = endpoint
            yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def upload_folder(directory: str, url: str) -> str:
    """Every file of ``directory`` to the ``s3://bucket/prefix`` folder ``url`` (through ``dr.storage.upload_file``,
    the bucket must exist); returns ``url``."""
    for name in sorted(os.listdir(directory)):
        if os.path.isfile(os.path.join(directory, name)):
            storage.upload_file(os.path.join(directory, name), storage.join(url, name))
    return url


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.startswith('/forbidden/'):
            self.send_error(403, 'Forbidden')
            return
        if self.path.startswith('/cut/'):
            path = self.translate_path('/' + self.path[len('/cut/'):])
            if not os.path.isfile(path):
                self.send_error(404)
                return
            with open(path, 'rb') as f:
                data = f.read()
            self.send_response(200)
            self.send_header('Content-Length', str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.close_connection = True
            return
        if self.path.startswith('/norange/'):
            self.path = '/' + self.path[len('/norange/'):]
            super().do_GET()
            return
        ranged = re.fullmatch(r'bytes=(\d+)-(\d+)', self.headers.get('Range', ''))
        path = self.translate_path(self.path)
        if ranged is None or not os.path.isfile(path):
            super().do_GET()
            return
        first, last = int(ranged.group(1)), int(ranged.group(2))
        total = os.path.getsize(path)
        if first > last or first >= total:
            self.send_error(416, 'Range Not Satisfiable')
            return
        last = min(last, total - 1)
        with open(path, 'rb') as f:
            f.seek(first)
            data = f.read(last - first + 1)
        self.send_response(206)
        self.send_header('Content-Range', f'bytes {first}-{last}/{total}')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_HEAD(self) -> None:  # noqa: N802
        if self.path.startswith('/forbidden/'):
            self.send_error(403, 'Forbidden')
            return
        for hook in ('/cut/', '/norange/'):
            if self.path.startswith(hook):
                self.path = '/' + self.path[len(hook):]
        super().do_HEAD()


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)  # a client that stops reading early is no server error


@contextlib.contextmanager
def http_server(directory: str) -> Iterator[str]:
    """``http.server`` serving ``directory`` on a free loopback port (a thread of this process); yields its base
    URL."""
    server = _Server(('127.0.0.1', 0), functools.partial(_Handler, directory=directory))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f'http://127.0.0.1:{server.server_address[1]}'
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
