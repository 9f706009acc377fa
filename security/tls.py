"""A private certificate authority, server and client certificates (``cryptography``), and the
server's TLS context: TLS 1.3 only, optionally requiring a client certificate (mutual TLS).

Layout of a TLS folder (``enclave tls init``)::

    ca.pem  ca-key.pem  server.pem  server-key.pem  clients/<name>.pem  clients/<name>-key.pem

Private keys are written with mode 0600 (created so, never chmod-ed afterwards).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 397  # the public-web maximum; a private CA needs no more to stay honest about renewal
DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


class TlsError(Exception):
    pass


@dataclass(frozen=True)
class TlsFiles:
    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca-key.pem"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server-key.pem"

    def client_cert(self, name: str) -> Path:
        return self.folder / "clients" / f"{name}.pem"

    def client_key(self, name: str) -> Path:
        return self.folder / "clients" / f"{name}-key.pem"


def new_key(kind: str = "ec"):
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise TlsError("key type must be ec (P-256) or rsa (3072 bits)")


def _write_key(path: Path, key) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, not even briefly
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, path)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = _now()
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def _hash_for(key):
    return hashes.SHA384() if isinstance(key, rsa.RSAPrivateKey) else hashes.SHA256()


def create_ca(files: TlsFiles, key_type: str = "ec", common_name: str = "Enclave private CA") -> x509.Certificate:
    key = new_key(key_type)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Enclave"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (_builder(name, name, key.public_key(), CA_DAYS)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, _hash_for(key)))
    _write_key(files.ca_key, key)
    _write_cert(files.ca_cert, cert)
    return cert


def load_ca(files: TlsFiles):
    if not files.ca_cert.is_file() or not files.ca_key.is_file():
        raise TlsError(f"no CA in {files.folder}: run `enclave tls init` first")
    cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    return cert, key


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if not re.fullmatch(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", name):
                raise TlsError(f"not a host name or IP address: {name!r}") from None
            entries.append(x509.DNSName(name.lower()))
    return x509.SubjectAlternativeName(entries)


def _leaf(files: TlsFiles, common_name: str, usage, sans: list[str] | None, key_type: str):
    ca_cert, ca_key = load_ca(files)
    key = new_key(key_type)
    builder = (_builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]), ca_cert.subject,
                        key.public_key(), LEAF_DAYS)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=isinstance(key, rsa.RSAPrivateKey), data_encipherment=False,
                                            key_agreement=False, key_cert_sign=False, crl_sign=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if sans:
        builder = builder.add_extension(_san(sans), critical=False)
    return builder.sign(ca_key, _hash_for(ca_key)), key


def issue_server(files: TlsFiles, names: list[str] = (), key_type: str = "ec") -> x509.Certificate:
    """A server certificate for localhost, 127.0.0.1, ::1 and ``names`` (DNS names or IP addresses)."""
    sans = [*DEFAULT_SANS, *names]
    cert, key = _leaf(files, names[0] if names else "localhost", ExtendedKeyUsageOID.SERVER_AUTH, sans, key_type)
    _write_key(files.server_key, key)
    _write_cert(files.server_cert, cert)
    return cert


def issue_client(files: TlsFiles, name: str, key_type: str = "ec") -> x509.Certificate:
    if not _CLIENT_NAME.fullmatch(name):
        raise TlsError("client name: 1-64 letters, digits and _ . @ - (it becomes the certificate's CN)")
    cert, key = _leaf(files, name, ExtendedKeyUsageOID.CLIENT_AUTH, None, key_type)
    _write_key(files.client_key(name), key)
    _write_cert(files.client_cert(name), cert)
    return cert


def init(folder: Path, names: list[str] = (), key_type: str = "ec") -> tuple[TlsFiles, bool]:
    """Creates the CA unless one is there (then it is reused), and (re)issues the server certificate.
    Returns the files and whether a new CA was created."""
    files = TlsFiles(Path(folder))
    created = not files.ca_cert.exists()
    if created:
        files.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        create_ca(files, key_type)
    issue_server(files, list(names), key_type)
    return files, created


def server_context(certfile: str | Path, keyfile: str | Path, client_ca: str | Path | None = None) -> ssl.SSLContext:
    """TLS 1.3 only; with ``client_ca`` every client must present a certificate that CA issued."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.load_cert_chain(str(certfile), str(keyfile))
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(client_ca))
    return ctx
