"""A real local Schema Registry (Apicurio Registry) for development and tests.

Apicurio publishes its complete runnable application on Maven Central
(``io.apicurio:apicurio-registry-app:<version>:tar.gz:all``); it is fetched
once with Maven into ``~/.cache/nlpstream/apicurio/<version>``, started with a
Java that can run it (3.0.x: 17 or newer; 3.1 and later: 21 or newer), bound
to 127.0.0.1 only (its management interface too), with in-memory storage. It
serves the Confluent-compatible API under ``/apis/ccompat/v7``.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from nlpstream.consumers.errors import ConsumerError
from nlpstream.consumers.kafka_local import _pid_alive, cache_root, free_port, terminate

DEFAULT_REGISTRY_VERSION = "3.0.9"
_STATE_FILE = "nlpstream-registry.json"
CCOMPAT_PATH = "/apis/ccompat/v7"


class RegistryLocalError(ConsumerError):
    """The local schema registry could not be installed, started or stopped."""


@dataclass(frozen=True, slots=True)
class RegistryInfo:
    """Where a local registry listens and how to find its process."""

    pid: int
    port: int
    management_port: int
    data_dir: str
    version: str

    @property
    def url(self) -> str:
        """The Confluent-compatible API (what ``--schema-registry-url`` takes)."""
        return f"http://127.0.0.1:{self.port}{CCOMPAT_PATH}"


def _needed_java(version: str) -> int:
    match = re.match(r"(\d+)\.(\d+)", version)
    if not match:
        raise RegistryLocalError(f"registry version {version!r} is not a version number such as 3.0.9")
    return 17 if (int(match.group(1)), int(match.group(2))) < (3, 1) else 21


def ensure_app(version: str = DEFAULT_REGISTRY_VERSION, timeout_s: float = 900.0) -> Path:
    """The folder holding the registry's runnable jar, downloading it once with Maven."""
    home = cache_root() / "apicurio" / version
    if _runner(home) is not None:
        return home
    mvn = shutil.which("mvn")
    if mvn is None:
        raise RegistryLocalError("Maven ('mvn') is needed once to download the schema registry; install it "
                                 "or set SCHEMA_REGISTRY_URL")
    download = home.parent / f".download-{version}"
    shutil.rmtree(download, ignore_errors=True)
    download.mkdir(parents=True)
    cmd = [mvn, "-q", "-B", "dependency:copy",
           f"-Dartifact=io.apicurio:apicurio-registry-app:{version}:tar.gz:all", f"-DoutputDirectory={download}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False, cwd=download)
    except subprocess.TimeoutExpired as exc:
        raise RegistryLocalError(f"Maven did not finish downloading Apicurio Registry {version} in {timeout_s:.0f}s") from exc
    archives = list(download.glob("*.tar.gz"))
    if proc.returncode != 0 or not archives:
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise RegistryLocalError(f"Maven failed to download Apicurio Registry {version} (exit {proc.returncode}):\n{tail}")
    partial = home.parent / f".partial-{version}"
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(archives[0]) as tar:
        try:
            tar.extractall(partial, filter="data")  # no paths outside the folder, no device files
        except TypeError:  # Python before 3.11.4: check the member paths ourselves
            for member in tar.getmembers():
                target = (partial / member.name).resolve()
                if not str(target).startswith(str(partial.resolve())) or member.isdev():
                    raise RegistryLocalError(f"unsafe path in the registry archive: {member.name}") from None
            tar.extractall(partial)
    shutil.rmtree(download, ignore_errors=True)
    if _runner(partial) is None:
        raise RegistryLocalError(f"the Apicurio Registry {version} archive holds no runnable jar")
    shutil.rmtree(home, ignore_errors=True)
    partial.rename(home)
    return home


def _runner(home: Path) -> Path | None:
    for pattern in ("*-runner.jar", "quarkus-app/quarkus-run.jar", "quarkus-run.jar", "*/quarkus-run.jar"):
        found = sorted(home.glob(pattern))
        if found:
            return found[0]
    return None


def _java_major(java: str) -> int:
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired):
        return 0
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not match:
        return 0
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def find_java(minimum: int) -> str:
    """A ``java`` of at least version ``minimum``: JAVA_HOME, PATH, then the JDKs under /usr/lib/jvm."""
    candidates = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(str(Path(os.environ["JAVA_HOME"]) / "bin" / "java"))
    if shutil.which("java"):
        candidates.append(shutil.which("java"))
    candidates += sorted(glob.glob("/usr/lib/jvm/*/bin/java"), reverse=True)
    seen = []
    for java in dict.fromkeys(c for c in candidates if c and Path(c).exists()):
        major = _java_major(java)
        seen.append(f"{java} ({major or '?'})")
        if major >= minimum:
            return java
    raise RegistryLocalError(f"the schema registry needs Java {minimum} or newer; found: {', '.join(seen) or 'none'}")


def read_state(data_dir: str | Path) -> RegistryInfo | None:
    path = Path(data_dir) / _STATE_FILE
    if not path.exists():
        return None
    return RegistryInfo(**json.loads(path.read_text()))


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/subjects", timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def status(data_dir: str | Path) -> tuple[RegistryInfo | None, bool]:
    """(recorded registry, whether it runs and answers)."""
    info = read_state(data_dir)
    if info is None:
        return None, False
    return info, _pid_alive(info.pid) and _answers(info.url)


def start(data_dir: str | Path, port: int = 0, version: str = DEFAULT_REGISTRY_VERSION,
          timeout_s: float = 180.0, heap: str = "384m") -> RegistryInfo:
    """Start a registry in the background (or return the one already running there); returns once it answers."""
    data = Path(data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    recorded, running = status(data)
    if recorded is not None and running:
        return recorded
    if recorded is not None and _ours(recorded):  # started but not answering (yet): replace it
        stop(data)
    home = ensure_app(version)
    runner = _runner(home)
    assert runner is not None
    java = find_java(_needed_java(version))
    if port == 0:
        port = recorded.port if recorded is not None else free_port()
    if not _port_free(port):
        raise RegistryLocalError(f"port {port} on 127.0.0.1 is taken (another registry?); pick another with --port "
                                 "or 0 for a free one")
    management = free_port()  # Quarkus' management interface, where a version enables it: loopback too
    props = {
        "quarkus.http.host": "127.0.0.1", "quarkus.http.port": port,
        "quarkus.management.host": "127.0.0.1", "quarkus.management.port": management,
        "quarkus.log.file.enable": "false", "quarkus.http.access-log.enabled": "false",
    }
    cmd = [java, f"-Xmx{heap}", "-Djava.awt.headless=true", *(f"-D{k}={v}" for k, v in props.items()),
           "-jar", str(runner)]
    out = open(data / "registry.out", "ab")  # noqa: SIM115 - handed to the child process
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=runner.parent)
    out.close()
    info = RegistryInfo(pid=proc.pid, port=port, management_port=management, data_dir=str(data), version=version)
    (data / _STATE_FILE).write_text(json.dumps(asdict(info)))
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:  # first: an answer on the port from someone else is no success
            raise RegistryLocalError(f"the schema registry exited with code {proc.returncode}; "
                                     f"see {data / 'registry.out'}")
        if time.monotonic() > deadline:
            stop(data)
            raise RegistryLocalError(f"the schema registry did not answer within {timeout_s:.0f}s; "
                                     f"see {data / 'registry.out'}")
        if _answers(info.url):
            return info
        time.sleep(0.3)


def _ours(info: RegistryInfo) -> bool:
    """True when the recorded pid is alive and still a Java running the registry (pids get reused)."""
    if not _pid_alive(info.pid):
        return False
    try:
        cmdline = Path(f"/proc/{info.pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust the pid
    return b"apicurio-registry" in cmdline or b"quarkus-run.jar" in cmdline


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def stop(data_dir: str | Path, timeout_s: float = 30.0) -> bool:
    """Stop the registry started in ``data_dir``; True when one was running."""
    info = read_state(data_dir)
    if info is None or not _ours(info):
        return False
    terminate(info.pid, timeout_s)
    return True
