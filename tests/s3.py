"""Helpers for the s3:// output tests: a real S3 API server (moto, server mode) and reading it back.

The server runs in its own process on a port the OS picks, with IAM checks
on: after start-up only the keys made here are accepted, and a request
signed with a wrong secret is refused (SignatureDoesNotMatch), as AWS does.
Two users: ``writer`` (s3:* on everything: what the job runs as) and
``admin`` (everything, IAM included: what a test uses to change the
writer's rights mid-stream).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REGION = "us-east-1"
WRITER_POLICY = json.dumps({"Version": "2012-10-17",
                            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]})
_ADMIN_POLICY = json.dumps({"Version": "2012-10-17",
                            "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})
_LAUNCH = ("import sys, time; from moto.server import ThreadedMotoServer; "
           "s = ThreadedMotoServer('127.0.0.1', 0, verbose=False); s.start(); "
           "print(s.get_host_and_port()[1], flush=True); time.sleep(10**6)")


@dataclass
class S3Server:
    """A running moto server: its endpoint and the keys of its two users."""

    proc: subprocess.Popen[str]
    endpoint: str
    key_id: str
    secret: str
    admin_key_id: str
    admin_secret: str
    _fs: Any = None

    def env(self) -> dict[str, str]:
        """The standard AWS environment of the writer (what a pod gets from its Secret)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key_id,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_REGION": REGION}

    def storage_options(self, secret: str | None = None) -> dict[str, Any]:
        """``output.storage_options`` of the writer (``secret`` replaces its secret key)."""
        return {"key": self.key_id, "secret": secret or self.secret, "endpoint_url": self.endpoint,
                "client_kwargs": {"region_name": REGION}}

    def client(self, service: str = "s3", admin: bool = False) -> Any:
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=self.admin_key_id if admin else self.key_id,
                            aws_secret_access_key=self.admin_secret if admin else self.secret)

    def filesystem(self) -> Any:
        """An s3fs file system as the admin (a reader the tests never revoke), without a listing cache.

        One client, made once: tests poll with it. With s3fs's listing cache on, a reader polling a prefix
        that is being written could list a new object and then fail to open it: the dataset's discovery
        lists afresh, but opening checks ``isfile`` against the folder's cached, older listing (reproduced
        with a plain PUT loop beside a pyarrow reader: 11 of 11 reads failed with the cache, 0 without).
        """
        import s3fs

        if self._fs is None:
            self._fs = s3fs.S3FileSystem(key=self.admin_key_id, secret=self.admin_secret, endpoint_url=self.endpoint,
                                         client_kwargs={"region_name": REGION}, skip_instance_cache=True,
                                         use_listings_cache=False)
        self._fs.invalidate_cache()
        return self._fs

    def make_bucket(self, name: str) -> str:
        self.client(admin=True).create_bucket(Bucket=name)
        return name

    def revoke_writer(self) -> None:
        self.client("iam", admin=True).delete_user_policy(UserName="writer", PolicyName="s3")

    def restore_writer(self) -> None:
        self.client("iam", admin=True).put_user_policy(UserName="writer", PolicyName="s3",
                                                       PolicyDocument=WRITER_POLICY)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)


def start(log: Path, timeout_s: float = 60.0) -> S3Server:
    """Start moto in server mode on a free port, make the two users, then turn IAM checks on."""
    import boto3

    proc = subprocess.Popen([sys.executable, "-c", _LAUNCH], stdout=subprocess.PIPE, stderr=open(log, "w"),  # noqa: SIM115
                            text=True)
    try:
        port = int(proc.stdout.readline().strip() or "0")  # type: ignore[union-attr]
        if not port:
            raise RuntimeError(f"moto server did not start: {log.read_text()[-2000:]}")
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        keys = {}
        for user, policy_name, policy in (("writer", "s3", WRITER_POLICY), ("admin", "all", _ADMIN_POLICY)):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName=policy_name, PolicyDocument=policy)
            keys[user] = iam.create_access_key(UserName=user)["AccessKey"]
        request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=10).read()  # from now on every request must be signed by a user
    except BaseException:
        proc.kill()
        raise
    return S3Server(proc, endpoint, keys["writer"]["AccessKeyId"], keys["writer"]["SecretAccessKey"],
                    keys["admin"]["AccessKeyId"], keys["admin"]["SecretAccessKey"])


def objects(server: S3Server, bucket: str) -> list[str]:
    """Every object key of the bucket, fresh from the server."""
    return server.filesystem().find(bucket)


def hidden_objects(server: S3Server, bucket: str) -> list[str]:
    """Objects whose name starts with '.' or '_' (temporary files, probes): none may be left visible."""
    return [key for key in objects(server, bucket) if key.rsplit("/", 1)[-1][:1] in (".", "_")]


def read_back(server: S3Server, url: str) -> Any:
    """The output under ``url`` (s3://bucket/prefix) as one Arrow table, read by pyarrow through s3fs."""
    import pyarrow.dataset as ds

    fs = server.filesystem()
    root = url.removeprefix("s3://")
    tries = 20  # a safety net from before the cause was found (the listing cache, see filesystem())
    for attempt in range(tries):
        fs.invalidate_cache()
        if not fs.find(root):
            return None
        try:
            return ds.dataset(root, filesystem=fs, format="parquet", partitioning="hive").to_table()
        except FileNotFoundError:
            if attempt == tries - 1:
                raise
            time.sleep(0.25)
    return None


def exactness_s3(server: S3Server, url: str, partitions: int, ids: list[str]) -> dict[str, int]:
    """Lost / duplicated ids and offset gaps of the output against the ``ids`` that were produced."""
    table = read_back(server, url)
    got = table.column("id").to_pylist() if table is not None else []
    counts = Counter(got)
    offsets = Counter(zip(table.column("partition").to_pylist(), table.column("offset").to_pylist())) \
        if table is not None else Counter()
    gaps = 0
    for p in range(partitions):
        seen = sorted(o for q, o in offsets if q == p)
        gaps += (seen[-1] + 1 - len(seen)) if seen else 0
    return {"rows": len(got), "lost": len(set(ids) - set(counts)), "duplicated": sum(c - 1 for c in counts.values()),
            "unexpected": len(set(counts) - set(ids)), "gaps": gaps,
            "partitions_seen": len({p for p, _ in offsets})}


def ends_per_partition(server: S3Server, url: str, partitions: int) -> list[int | None]:
    """Last offset + 1 of each partition's rows in the output (what the group must have committed)."""
    table = read_back(server, url)
    pairs = list(zip(table.column("partition").to_pylist(), table.column("offset").to_pylist()))
    return [max((o for p, o in pairs if p == q), default=-1) + 1 for q in range(partitions)]
