"""The threading HTTP server of one `Site` (`Server`), and whether a host it binds keeps it on
this machine (`is_loopback`), which decides the `Handler`'s `Host` and `Origin` checks."""

from __future__ import annotations

import errno
import ipaddress
import socket
import threading
from http.server import ThreadingHTTPServer

from pipeline.serve.handler import Handler
from pipeline.serve.site import Site

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine."""
    if host.lower() in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Server(ThreadingHTTPServer):
    """A threading HTTP server for one `Site`."""

    daemon_threads = True  # Ctrl-C does not wait for open connections

    def __init__(self, site: Site, host: str = "127.0.0.1", port: int = 8032):
        self.site = site
        self.loopback = is_loopback(host)
        self.local_hosts = LOCAL_HOSTS | {host.lower()}
        self.save_lock = threading.Lock()
        if ":" in host:
            self.address_family = socket.AF_INET6
        try:
            super().__init__((host, port), Handler)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            raise OSError(
                f"port {port} of {host} is in use (another `clt serve`?); pick another with --port"
            ) from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::"):
            host = socket.gethostname()
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/index.html"
