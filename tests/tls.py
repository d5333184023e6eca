"""A throwaway certificate authority for the TLS tests (PEM files, RSA 2048).

The broker gets an unencrypted PKCS#8 key followed by its certificate (what
Kafka's PEM keystore reads); the client gets its certificate and a key
encrypted with a password, so the tests exercise ``ssl_password`` too.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # CA certificate, trusted by both sides
    broker_keystore: Path  # broker key + certificate (SAN 127.0.0.1, localhost)
    client_cert: Path
    client_key: Path  # encrypted with ``client_key_password``
    client_key_password: str
    other_ca: Path  # a CA that signed nothing here: trusting only it must fail


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _cert(subject: str, key: rsa.RSAPrivateKey, issuer: str, issuer_key: rsa.RSAPrivateKey, *, ca: bool,
          usage: list[x509.ObjectIdentifier] | None = None, san: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: rsa.RSAPrivateKey, password: str | None = None) -> bytes:
    encryption = (serialization.BestAvailableEncryption(password.encode()) if password
                  else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def make_tls_files(folder: Path, client_key_password: str) -> TlsFiles:
    folder.mkdir(parents=True, exist_ok=True)
    new_key = lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)  # noqa: E731
    ca_key, broker_key, client_key, other_key = new_key(), new_key(), new_key(), new_key()
    ca = _cert("nlpstream test CA", ca_key, "nlpstream test CA", ca_key, ca=True)
    other = _cert("unrelated CA", other_key, "unrelated CA", other_key, ca=True)
    broker = _cert("127.0.0.1", broker_key, "nlpstream test CA", ca_key, ca=False,
                   usage=[ExtendedKeyUsageOID.SERVER_AUTH],
                   san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    client = _cert("nlpstream-client", client_key, "nlpstream test CA", ca_key, ca=False,
                   usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    files = TlsFiles(folder / "ca.pem", folder / "broker.pem", folder / "client.pem", folder / "client-key.pem",
                     client_key_password, folder / "other-ca.pem")
    files.ca.write_bytes(_pem(ca))
    files.other_ca.write_bytes(_pem(other))
    files.broker_keystore.write_bytes(_key_pem(broker_key) + _pem(broker))
    files.client_cert.write_bytes(_pem(client))
    files.client_key.write_bytes(_key_pem(client_key, client_key_password))
    return files
