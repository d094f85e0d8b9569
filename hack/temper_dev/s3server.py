"""A real S3 server on loopback: moto in server mode, for tests, the demo and benchmarks.

``S3Server().start()`` binds 127.0.0.1 on a free port, either in a thread of this process
(fast, for tests) or as a child process (``process=True``: isolated, for the demo). The fake
credentials are accepted by moto and are never real secrets.

    python -m temper_dev.s3server [--port N]     # serve until interrupted; prints the endpoint
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
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


class S3Server:
    def __init__(self, port: int | None = None, *, process: bool = False) -> None:
        self.port = port or free_port()
        self.process = process
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
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        else:
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

            self._thread_server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            self._thread_server.start()
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

    def stop(self) -> None:
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
