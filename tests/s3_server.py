"""An S3-compatible server on 127.0.0.1 for tests and benches: moto's, in a thread of
this process, with dummy credentials.

Everything that talks to it, here or in a subprocess that inherits the environment (a
stage under `dvc repro`), finds it the way a user points at their own endpoint:
`AWS_ENDPOINT_URL` (read by botocore, so by s3fs and Zarr's fsspec store alike).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

BUCKET = "clt-test"
_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_UNSET = ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


@contextlib.contextmanager
def s3_server(*, own_process: bool = False) -> Iterator[str]:
    """Run the server with bucket `BUCKET` while the block runs, the environment pointing
    at it (restored afterwards); yields its endpoint URL. In a thread of this process by
    default (it starts in a second); `own_process` runs it as a process of its own, so
    that a benchmark's client and server do not share one interpreter lock."""
    import fsspec

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    with _own_process() if own_process else _in_thread() as endpoint:
        saved = dict(os.environ)
        try:
            for name in _UNSET:
                os.environ.pop(name, None)
            os.environ.update(_ENV, AWS_ENDPOINT_URL=endpoint)
            fsspec.filesystem("s3", skip_instance_cache=True).mkdir(BUCKET)
            yield endpoint
        finally:
            os.environ.clear()
            os.environ.update(saved)


@contextlib.contextmanager
def _in_thread() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@contextlib.contextmanager
def _own_process(timeout_s: float = 30) -> Iterator[str]:
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"{' '.join(cmd)} did not start within {timeout_s} s") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait()
