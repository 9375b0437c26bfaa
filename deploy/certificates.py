"""TLS certificates and SuperNode keys for a deployment, made with ``cryptography`` (no openssl).

- ``generate_certificates``: a CA (``ca.crt``, ``ca.key``) and a SuperLink server certificate
  (``server.pem``, ``server.key``) signed by it, valid for the names and addresses clients use to
  reach the SuperLink (the compose service name, ``localhost``, loopback, any host names added).
  SuperNodes and the ``flwr`` CLI trust ``ca.crt``; a SuperNode given another CA cannot connect.
- ``generate_node_keys``: one ECDSA key pair per SuperNode in OpenSSH format (what
  ``flower-supernode --auth-supernode-private-key`` loads and ``flwr supernode register`` takes).

Docker's SuperLink/SuperNode containers run as uid 49999, so files are written world-readable
except the private keys (0600); ``docker/generate_certs.sh`` hands them to that uid.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("superlink", "localhost", "127.0.0.1", "::1")


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomic write, created with ``mode`` from the start (a private key is never readable by
    others, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, mode)  # os.open's mode is filtered by the umask
    os.replace(tmp, path)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "splitmix-fl"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())


def generate_certificates(out_dir: str | Path, hosts: list[str] | None = None, days: int = 365, key_bits: int = 2048) -> dict[str, Path]:
    """Write ``ca.crt``, ``ca.key``, ``server.pem``, ``server.key`` into ``out_dir``.

    ``hosts``: every DNS name or IP address the SuperLink is reached under (default: the compose
    service name ``superlink`` plus loopback). Returns the paths by role.
    """
    out = Path(out_dir)
    hosts = list(dict.fromkeys(hosts or DEFAULT_HOSTS))
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate small clock skew
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=key_bits)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("splitmix-fl CA"))
        .issuer_name(_name("splitmix-fl CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=key_bits)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca_cert": out / "ca.crt", "ca_key": out / "ca.key", "server_cert": out / "server.pem", "server_key": out / "server.key"}
    _write(paths["ca_cert"], ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(paths["ca_key"], _pem_key(ca_key), 0o600)
    _write(paths["server_cert"], server_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(paths["server_key"], _pem_key(server_key), 0o600)
    return paths


def certificate_hosts(cert_path: str | Path) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for (its SAN)."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + [str(v) for v in san.get_values_for_type(x509.IPAddress)]


def generate_node_keys(out_dir: str | Path, names: list[str]) -> dict[str, tuple[Path, Path]]:
    """One ECDSA (P-384) key pair per node: ``<name>`` (private, OpenSSH) and ``<name>.pub``."""
    out = Path(out_dir)
    keys: dict[str, tuple[Path, Path]] = {}
    for name in names:
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(out / name, private, 0o600)
        _write(out / f"{name}.pub", public + f" {name}\n".encode(), 0o644)
        keys[name] = (out / name, out / f"{name}.pub")
    return keys
