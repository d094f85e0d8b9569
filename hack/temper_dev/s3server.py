"""A real S3 server on loopback: moto in server mode, for tests, the demo and benchmarks.

``S3Server().start()`` binds 127.0.0.1 on a free port, either in a thread of this process
(fast, for tests) or as a child process (``process=True``: isolated, for the demo). The fake
credentials are accepted by moto and are never real secrets.

Outages (``outages=True``): clients talk to a small TCP proxy on the public port and moto
listens on a private one. ``outage("blackhole")`` stops forwarding: connections stay open and
never answer, like a network partition, so client timeouts are exercised; ``outage("refuse")``
resets every connection. ``restore()`` ends it. moto keeps its objects in memory, so stopping
the server would lose data an outage must not lose; SIGSTOP would only work for a child process
and would also freeze in-flight uploads halfway. The proxy keeps moto untouched.

    python -m temper_dev.s3server [--port N]     # serve until interrupted; prints the endpoint
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from typing import Any

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "temper-test-key",
    "AWS_SECRET_ACCESS_KEY": "temper-test-secret-do-not-log",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OutageProxy:
    """Loopback TCP forwarder that can be switched into an outage and back."""

    MODES = ("blackhole", "refuse")

    def __init__(self, port: int, upstream_port: int) -> None:
        self.port = port
        self.upstream_port = upstream_port
        self.mode: str | None = None  # None: forwarding
        self._lock = threading.Lock()
        self._pairs: dict[socket.socket, socket.socket] = {}  # client -> moto
        self._parked: list[socket.socket] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(128)
        self._closed = False
        threading.Thread(target=self._accept_loop, name="s3-proxy", daemon=True).start()

    def outage(self, mode: str) -> None:
        if mode not in self.MODES:
            raise ValueError(f"outage mode must be one of {self.MODES}, not {mode!r}")
        with self._lock:
            self.mode = mode
            pairs, self._pairs = self._pairs, {}
            if mode == "blackhole":
                # In-flight requests never get their answer: the client side stays open.
                self._parked.extend(pairs)
        for client, upstream in pairs.items():
            _close(upstream)
            if mode == "refuse":
                _close(client)

    def restore(self) -> None:
        with self._lock:
            self.mode = None
            parked, self._parked = self._parked, []
        for sock in parked:
            _close(sock)

    def close(self) -> None:
        self._closed = True
        self.outage("refuse")
        _close(self._listener)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                mode = self.mode
                if mode == "blackhole":
                    self._parked.append(client)
                    continue
            if mode == "refuse":
                _close(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._pairs[client] = upstream
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with self._lock:
            parked = client in self._parked
            self._pairs.pop(client, None)
        for sock in (src, dst):
            if not (parked and sock is client):
                _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class S3Server:
    def __init__(self, port: int | None = None, *, process: bool = False, outages: bool = False) -> None:
        self.port = port or free_port()
        self.process = process
        # With outages, moto listens privately and the proxy owns the public port.
        self.moto_port = free_port() if outages else self.port
        self.proxy: OutageProxy | None = None
        self._thread_server: Any = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for a client process: fake credentials (no real secret ever)."""
        return dict(FAKE_CREDENTIALS)

    def start(self, timeout: float = 30.0) -> S3Server:
        if self.process:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.moto_port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        else:
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

            self._thread_server = ThreadedMotoServer(
                ip_address="127.0.0.1", port=self.moto_port, verbose=False
            )
            self._thread_server.start()
        if self.moto_port != self.port:
            self.proxy = OutageProxy(self.port, self.moto_port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.endpoint_url + "/moto-api/", timeout=1):
                    return self
            except OSError:
                if self._proc is not None and self._proc.poll() is not None:
                    break
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto S3 server did not come up on {self.endpoint_url}")

    def outage(self, mode: str = "blackhole") -> None:
        """Make S3 unavailable (see the module doc); objects stored so far are kept."""
        if self.proxy is None:
            raise RuntimeError("S3Server(outages=True) is needed for outages")
        self.proxy.outage(mode)

    def restore(self) -> None:
        if self.proxy is not None:
            self.proxy.restore()

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
            self.proxy = None
        if self._thread_server is not None:
            self._thread_server.stop()
            self._thread_server = None
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def create_bucket(self, name: str | None = None) -> str:
        bucket = name or f"temper-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args()
    server = S3Server(args.port, process=False).start()
    print(
        json.dumps(
            {"endpointUrl": server.endpoint_url, **{k: v for k, v in server.env.items() if "SECRET" not in k}}
        )
    )
    sys.stdout.flush()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    os.environ.setdefault("MOTO_ALLOW_NONEXISTENT_REGION", "true")
    main()
