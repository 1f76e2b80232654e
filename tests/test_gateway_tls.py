"""The gateway serves https with an ordinary certificate and key."""

from __future__ import annotations

import json
import shutil
import ssl
import urllib.request

import pytest
from conftest import self_signed_cert, start_gateway


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_gateway_serves_https(tmp_path):
    cert, key = self_signed_cert(tmp_path)
    gateway = start_gateway(tmp_path, "--certfile", str(cert), "--keyfile", str(key))
    try:
        assert gateway.url.startswith("https://127.0.0.1:")
        trust = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(gateway.url + "/api/openapi.json", context=trust) as reply:
            assert json.load(reply)["openapi"].startswith("3.")
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(gateway.url + "/api/openapi.json", timeout=10)  # untrusted
    finally:
        gateway.stop()
