"""A real nginx in front of gateway replicas for the tests: round-robin, websockets proxied, no
sticky sessions, on loopback, its files in a temporary folder. `make install` installs Debian's
nginx where it is missing; without it the replica tests skip with one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

# As docs/deploy.md shows it for a team's own load balancer: what matters for gpupool is the
# websocket upgrade, long reads (a kernel's socket idles for hours), no buffering (cell output
# streams) and a body size above the largest notebook share.
CONFIG = """
worker_processes 1;
daemon off;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
{user}
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    upstream gateways {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 64m;
        location / {{
            proxy_pass http://gateways;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_connect_timeout 2s;
        }}
    }}
}}
"""


def binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


class Nginx:
    def __init__(self, folder: Path, port: int, upstreams: list[str]) -> None:
        """Round-robin over `upstreams` ("127.0.0.1:8001", ...), listening on `port`."""
        program = binary()
        if program is None:
            raise FileNotFoundError("nginx is not installed (`make install` as root installs it)")
        folder.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{port}"
        servers = "\n".join(f"        server {u} max_fails=1 fail_timeout=5s;" for u in upstreams)
        # As root, its workers would run as nobody, who cannot write this folder.
        user = "user root;" if os.geteuid() == 0 else ""
        config = folder / "nginx.conf"
        config.write_text(CONFIG.format(folder=folder, port=port, servers=servers, user=user))
        self.log = open(folder / "stdout.log", "w")
        self.proc = subprocess.Popen(
            [program, "-p", str(folder), "-c", str(config)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"nginx exited: {(folder / 'error.log').read_text()}")
            try:
                urllib.request.urlopen(self.url + "/api/health", timeout=2).close()
                return
            except urllib.error.HTTPError:
                return  # it answers (a replica may not be ready yet; nginx is)
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError("nginx did not answer within 15 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
