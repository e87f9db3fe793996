"""A real S3 API on 127.0.0.1: moto's standalone server in a subprocess, so tests can kill it.

Used by tests/storage/test_s3_mirror.py and benchmarks/bench_s3_mirror.py. State lives in the server's
memory: after :meth:`MotoS3Server.kill` and :meth:`start` the buckets are empty again.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig

from rayllm_app.ports import free_port

# moto accepts any credentials unless IAM authentication is switched on (see enforce_auth).
FAKE_CREDENTIALS = {"aws_access_key_id": "AKIAFAKEMIRRORTEST", "aws_secret_access_key": "fake-secret-for-tests"}


class MotoS3Server:
    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30) -> MotoS3Server:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log, stderr=log, env=env,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode} on port {self.port}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"moto server did not listen on port {self.port} within {timeout_s} s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def client(self, service: str = "s3", **credentials: str):
        return boto3.client(service, endpoint_url=self.url, region_name="us-east-1",
                            **(credentials or FAKE_CREDENTIALS))

    def enforce_auth(self, enabled: bool) -> None:
        """Switch moto's IAM authentication (signature and permission checks) on or off."""
        request = urllib.request.Request(
            f"{self.url}/moto-api/reset-auth", data=b"0" if enabled else b"inf", method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            json.loads(response.read())

    def upload_folder(self, folder: Path, bucket: str, prefix: str, create: bool = True) -> None:
        s3 = self.client()
        if create:
            s3.create_bucket(Bucket=bucket)
        config = TransferConfig(multipart_chunksize=8 << 20, max_concurrency=4)
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                s3.upload_file(str(path), bucket, prefix + path.relative_to(folder).as_posix(), Config=config)
