"""A local S3-compatible server for the object-store tests: moto's server on 127.0.0.1, reached
through a TCP relay that the tests can cut (clients then get "connection refused", as from a
store that went away) and restore, while the server keeps what it holds."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}

_REQUEST_LINE = re.compile(rb"(?:GET|PUT|POST|HEAD|DELETE) /\S* HTTP/1\.[01]\r\n")


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: bound, then closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def store_at(path: str, port: int) -> str:
    """The URI of `path` on an S3 endpoint at 127.0.0.1:`port`."""
    return f"s3://{path}?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"


class Relay:
    """Forwards 127.0.0.1:port to the server's port, until `cut()`; `restore()` listens again."""

    def __init__(self, target: int) -> None:
        self.target, self.port = target, free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.requests = 0  # HTTP requests relayed to the server (a benchmark counts them)
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Stop listening and drop every open connection."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            for a, b, count in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, count), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        try:
            while data := source.recv(65536):
                if count:  # request lines ("PUT /bucket/key HTTP/1.1") in what clients send
                    self.requests += len(_REQUEST_LINE.findall(data))
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for conn in (source, sink):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class S3Server:
    """moto's server in its own process, behind a Relay; `uri(path)` names a run dir in it."""

    def __init__(self, bucket: str = "runs") -> None:
        port = free_port()
        server = Path(sys.executable).with_name("moto_server")
        self.process = subprocess.Popen(
            [str(server), "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.1)
        self.relay = Relay(port)
        self.bucket = bucket
        os.environ.update({k: os.environ.get(k, v) for k, v in CREDENTIALS.items()})
        self.filesystem(allow_bucket_creation=True).create_dir(bucket)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.relay.port}"

    def uri(self, path: str) -> str:
        query = f"endpoint_override={self.endpoint}&scheme=http&region=us-east-1"
        return f"s3://{self.bucket}/{path}?{query}"

    def filesystem(self, **options):  # noqa: ANN003, ANN201
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            endpoint_override=self.endpoint, scheme="http", region="us-east-1", **options
        )

    def download(self, path: str, to: Path) -> Path:
        """Copy a run dir out of the bucket, so local readers can check it."""
        import pyarrow.fs as pafs

        pafs.copy_files(
            f"{self.bucket}/{path}",
            str(to),
            source_filesystem=self.filesystem(),
            destination_filesystem=pafs.LocalFileSystem(),
        )
        return to

    def close(self) -> None:
        self.relay.cut()
        self.process.terminate()
        self.process.wait(timeout=30)


def model_uri(server: S3Server, path: str) -> str:
    """The URI of `models/<path>` on the local server (the `model_store` fixture's bucket)."""
    return server.uri(path).replace(f"s3://{server.bucket}/", "s3://models/", 1)
