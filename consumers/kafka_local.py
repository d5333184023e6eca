"""A real single-node Apache Kafka broker (KRaft) for development and tests.

The official jars (``org.apache.kafka:kafka_2.13`` and its runtime
dependencies) are gathered from Maven Central with Maven once and cached under
``~/.cache/nlpstream/kafka/<version>``; the broker runs on Java 17+ as a
detached process whose pid, ports and log live in the data directory.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from nlpstream.consumers.errors import KafkaLocalError

DEFAULT_KAFKA_VERSION = "4.1.1"
_STATE_FILE = "nlpstream-broker.json"
_TLS_FILE = "nlpstream-broker-tls.json"


@dataclass(frozen=True, slots=True)
class BrokerInfo:
    """Where a local broker listens and how to find its process."""

    pid: int
    port: int
    controller_port: int
    data_dir: str
    version: str
    sasl_port: int | None = None
    ssl_port: int | None = None
    sasl_ssl_port: int | None = None

    @property
    def sasl_bootstrap_servers(self) -> str | None:
        """SASL_PLAINTEXT listener (SCRAM-SHA-256/512) when users were given at first start."""
        return _address(self.sasl_port)

    @property
    def ssl_bootstrap_servers(self) -> str | None:
        """SSL listener that requires a client certificate (mutual TLS), when started with ``tls``."""
        return _address(self.ssl_port)

    @property
    def sasl_ssl_bootstrap_servers(self) -> str | None:
        """SASL_SSL listener (SCRAM over TLS), when started with ``tls`` and ``scram_users``."""
        return _address(self.sasl_ssl_port)

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"


def _address(port: int | None) -> str | None:
    return f"127.0.0.1:{port}" if port else None


@dataclass(frozen=True, slots=True)
class BrokerTls:
    """PEM files for the broker's TLS listeners.

    ``keystore_file`` holds the broker's unencrypted PKCS#8 private key
    followed by its certificate chain (the certificate must name 127.0.0.1);
    ``ca_file`` holds the CA certificates that client certificates are
    checked against on the mutual-TLS listener.
    """

    ca_file: str
    keystore_file: str


def cache_root() -> Path:
    """The cache folder; ``NLPSTREAM_CACHE_DIR`` overrides ``~/.cache/nlpstream``."""
    return Path(os.environ.get("NLPSTREAM_CACHE_DIR", Path.home() / ".cache" / "nlpstream"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_jars(version: str = DEFAULT_KAFKA_VERSION, timeout_s: float = 600.0) -> Path:
    """Return a folder with the broker's jars, downloading them once with Maven.

    Raises KafkaLocalError when Maven is missing or the download fails.
    """
    libs = cache_root() / "kafka" / version / "libs"
    if (libs / f"kafka_2.13-{version}.jar").exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaLocalError("Maven ('mvn') is needed once to download the Kafka jars; install it or set KAFKA_BOOTSTRAP_SERVERS")
    work = libs.parent / "pom"
    work.mkdir(parents=True, exist_ok=True)
    pom = resources.files("nlpstream.consumers").joinpath("kafka_pom.xml").read_text()
    (work / "pom.xml").write_text(pom.replace("@KAFKA_VERSION@", version))
    tmp = libs.parent / ".libs-partial"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [mvn, "-q", "-B", "-f", str(work / "pom.xml"), "dependency:copy-dependencies",
           f"-DoutputDirectory={tmp}", "-DincludeScope=runtime"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise KafkaLocalError(f"Maven did not finish downloading Kafka {version} in {timeout_s:.0f}s") from exc
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise KafkaLocalError(f"Maven failed to download Kafka {version} (exit {proc.returncode}):\n{tail}")
    shutil.rmtree(libs, ignore_errors=True)
    tmp.rename(libs)
    return libs


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise KafkaLocalError("Java 17 or newer is needed to run the local Kafka broker")
    return java


def _write_config(data_dir: Path, port: int, controller_port: int, sasl_port: int | None = None,
                  ssl_port: int | None = None, sasl_ssl_port: int | None = None,
                  tls: BrokerTls | None = None) -> Path:
    logs = data_dir / "kraft-logs"
    extra = {name: p for name, p in (("SASL_PLAINTEXT", sasl_port), ("SSL", ssl_port), ("SASL_SSL", sasl_ssl_port)) if p}
    served = [f"PLAINTEXT://127.0.0.1:{port}", *(f"{name}://127.0.0.1:{p}" for name, p in extra.items())]
    listeners = ",".join([*served, f"CONTROLLER://127.0.0.1:{controller_port}"])
    advertised = ",".join(served)
    protocol_map = ",".join(["CONTROLLER:PLAINTEXT", "PLAINTEXT:PLAINTEXT", *(f"{name}:{name}" for name in extra)])
    security: dict[str, str] = {}
    module = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    for name in ("SASL_PLAINTEXT", "SASL_SSL"):
        if name in extra:
            security["sasl.enabled.mechanisms"] = "SCRAM-SHA-256,SCRAM-SHA-512"
            for mech in ("scram-sha-256", "scram-sha-512"):
                security[f"listener.name.{name.lower()}.{mech}.sasl.jaas.config"] = module
    if tls is not None and (ssl_port or sasl_ssl_port):
        security.update({
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(Path(tls.keystore_file).resolve()),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(Path(tls.ca_file).resolve()),
            "listener.name.ssl.ssl.client.auth": "required",  # the SSL listener is mutual TLS
        })
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": f"127.0.0.1:{controller_port}",
        "listeners": listeners,
        "advertised.listeners": advertised,
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": protocol_map,
        **security,
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(logs),
        "num.partitions": "1",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "10",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "true",
        "message.max.bytes": str(8 * 1024 * 1024),
    }
    path = data_dir / "server.properties"
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    (data_dir / "log4j2.properties").write_text(
        "status = warn\n"
        "appender.file.type = File\n"
        "appender.file.name = FILE\n"
        f"appender.file.fileName = {data_dir / 'broker.log'}\n"
        "appender.file.layout.type = PatternLayout\n"
        "appender.file.layout.pattern = [%d] %p %m (%c)%n\n"
        "rootLogger.level = INFO\n"
        "rootLogger.appenderRef.file.ref = FILE\n"
    )
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child is not alive
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def read_state(data_dir: str | Path) -> BrokerInfo | None:
    """The broker recorded in ``data_dir``, or None when none was started there."""
    path = Path(data_dir) / _STATE_FILE
    if not path.exists():
        return None
    return BrokerInfo(**json.loads(path.read_text()))


def status(data_dir: str | Path) -> tuple[BrokerInfo | None, bool]:
    """(recorded broker, whether it is running and accepting connections)."""
    info = read_state(data_dir)
    if info is None:
        return None, False
    return info, _pid_alive(info.pid) and _port_open(info.port)


def _wait_ready(info: BrokerInfo, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    from kafka import KafkaAdminClient  # local import: only the launcher needs an admin client
    from kafka.errors import KafkaError

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise KafkaLocalError(
                f"Kafka broker exited with code {proc.returncode}; see {Path(info.data_dir) / 'broker.log'}"
            )
        if _port_open(info.port):
            try:
                admin = KafkaAdminClient(bootstrap_servers=info.bootstrap_servers, request_timeout_ms=5000)
                try:
                    admin.list_topics()
                    return
                finally:
                    admin.close()
            except (KafkaError, OSError) as exc:
                last = exc
        time.sleep(0.5)
    raise KafkaLocalError(f"Kafka broker not ready after {timeout_s:.0f}s ({last}); see {info.data_dir}/broker.log")


def start(
    data_dir: str | Path,
    port: int = 0,
    version: str = DEFAULT_KAFKA_VERSION,
    timeout_s: float = 90.0,
    heap: str = "512m",
    scram_users: dict[str, str] | None = None,
    tls: BrokerTls | None = None,
) -> BrokerInfo:
    """Start a broker in the background and return once it serves metadata.

    ``port=0`` picks a free port (a restart reuses the recorded one).
    ``scram_users`` (first start only) adds a SASL_PLAINTEXT listener with
    SCRAM-SHA-256/512 credentials for those users. ``tls`` (first start
    only) adds an SSL listener that requires client certificates (mutual
    TLS), and with ``scram_users`` also a SASL_SSL listener. A
    broker already running in ``data_dir`` is returned as is. The log
    directory is formatted once; later starts keep the data.
    """
    data = Path(data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    recorded, running = status(data)
    if recorded is not None and running:
        return recorded
    libs = ensure_jars(version)
    if port == 0:
        port = recorded.port if recorded is not None else free_port()
    controller_port = recorded.controller_port if recorded is not None else free_port()
    sasl_port = recorded.sasl_port if recorded is not None else (free_port() if scram_users else None)
    ssl_port = recorded.ssl_port if recorded is not None else (free_port() if tls else None)
    sasl_ssl_port = recorded.sasl_ssl_port if recorded is not None else (free_port() if tls and scram_users else None)
    if tls is None and (ssl_port or sasl_ssl_port):
        tls_state = json.loads((data / _TLS_FILE).read_text())  # a restart reuses the recorded files
        tls = BrokerTls(**tls_state)
    if tls is not None:
        (data / _TLS_FILE).write_text(json.dumps(asdict(tls)))
    config = _write_config(data, port, controller_port, sasl_port, ssl_port, sasl_ssl_port, tls)
    java = _java()
    classpath = f"{libs}/*"
    jvm = [f"-Xmx{heap}", f"-Xms{heap}", f"-Dlog4j2.configurationFile={data / 'log4j2.properties'}",
           f"-Dkafka.logs.dir={data}", "-Djava.awt.headless=true"]
    if not (data / "kraft-logs" / "meta.properties").exists():
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        scram = [arg for user, password in (scram_users or {}).items()
                 for mech in ("SCRAM-SHA-256", "SCRAM-SHA-512")
                 for arg in ("--add-scram", f"{mech}=[name={user},password={password}]")]
        fmt = subprocess.run(
            [java, *jvm, "-cp", classpath, "kafka.tools.StorageTool", "format", "--standalone",
             f"--cluster-id={cluster_id}", "-c", str(config), *scram],  # ids may start with "-"
            capture_output=True, text=True, timeout=120, check=False,
        )
        if fmt.returncode != 0:
            raise KafkaLocalError(f"formatting the Kafka log directory failed: {(fmt.stdout + fmt.stderr)[-2000:]}")
    out = open(data / "broker.out", "ab")  # noqa: SIM115 - handed to the child process
    proc = subprocess.Popen(
        [java, *jvm, "-cp", classpath, "kafka.Kafka", str(config)],
        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    out.close()
    info = BrokerInfo(pid=proc.pid, port=port, controller_port=controller_port, data_dir=str(data), version=version,
                      sasl_port=sasl_port, ssl_port=ssl_port, sasl_ssl_port=sasl_ssl_port)
    (data / _STATE_FILE).write_text(json.dumps(asdict(info)))
    try:
        _wait_ready(info, proc, timeout_s)
    except KafkaLocalError:
        stop(data)
        raise
    return info


def stop(data_dir: str | Path, timeout_s: float = 30.0) -> bool:
    """Stop the broker started in ``data_dir``; True when one was running.

    Sends SIGTERM (a clean shutdown), then SIGKILL after ``timeout_s``.
    """
    info = read_state(data_dir)
    if info is None or not _pid_alive(info.pid):
        return False
    terminate(info.pid, timeout_s)
    return True


def terminate(pid: int, timeout_s: float = 30.0) -> None:
    """SIGTERM (a clean shutdown), SIGKILL after ``timeout_s``; reaps the process when it is our child."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _reap(pid)
        if not _pid_alive(pid):
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(50):
        _reap(pid)
        if not _pid_alive(pid):
            break
        time.sleep(0.1)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
