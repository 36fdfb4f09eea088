"""Object storage for the tests, on 127.0.0.1 and free ports: the S3-compatible server of the
benchmarks (``benchmarks/local_s3.py``: SeaweedFS) and a plain HTTP server of a folder. A server
that cannot start skips its tests with the reason, except under CI, where it must start."""
import contextlib
import functools
import http.server
import os
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from local_s3 import S3Server, ServerUnavailable  # noqa: E402

@contextlib.contextmanager
def s3_server(folder: Path) -> Iterator[S3Server]:
    server = S3Server(folder)
    try:
        server.start()
    except ServerUnavailable as reason:
        if os.environ.get("CI"):
            pytest.fail(f"the S3 server must start in CI: {reason}")
        pytest.skip(str(reason))
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def http_server(folder: Path) -> Iterator[str]:
    """``folder`` served over plain HTTP (GET, HEAD, ranges as ``http.server`` answers them); its base URL."""
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        pass
