"""``nlpstream registry-local`` as users run it: a real Apicurio Registry, fetched once, bound to 127.0.0.1."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request

import pytest

pytestmark = pytest.mark.kafka  # a real server, never skipped

CLI = [sys.executable, "-m", "nlpstream.jobs.cli", "registry-local"]


def _other_address() -> str | None:
    """An address of this machine that is not loopback, when it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: only picks the outgoing interface
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


def test_start_status_stop_and_loopback_only(tmp_path):
    data = str(tmp_path / "registry")
    proc = subprocess.run(CLI + ["start", "--port", "0", "--data-dir", data], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout)
    try:
        url = info["url"]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/apis/ccompat/v7")
        assert json.loads(urllib.request.urlopen(f"{url}/subjects", timeout=10).read()) == []
        status = subprocess.run(CLI + ["status", "--data-dir", data], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and json.loads(status.stdout)["running"] is True
        again = subprocess.run(CLI + ["start", "--port", "0", "--data-dir", data], capture_output=True, text=True,
                               timeout=120)
        assert again.returncode == 0 and json.loads(again.stdout)["pid"] == info["pid"]  # the running one
        listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, timeout=30).stdout
        own = [line.split()[3] for line in listening.splitlines() if f"pid={info['pid']}," in line]
        assert own, listening  # the HTTP port at least
        assert all(addr.rsplit(":", 1)[0] in ("127.0.0.1", "[::ffff:127.0.0.1]") for addr in own), own
        other = _other_address()
        if other is not None:
            port = int(url.split(":")[2].split("/")[0])
            with socket.socket() as s, pytest.raises(OSError):
                s.settimeout(3)
                s.connect((other, port))
    finally:
        stop = subprocess.run(CLI + ["stop", "--data-dir", data], capture_output=True, text=True, timeout=120)
    assert stop.stdout.strip() == "stopped"
    status = subprocess.run(CLI + ["status", "--data-dir", data], capture_output=True, text=True, timeout=60)
    assert status.returncode == 1 and json.loads(status.stdout)["running"] is False
