"""A small private PKI for a federation: one CA, the coordinator's server certificate, one client
certificate per silo (CN = silo name), all with ``cryptography`` (ECDSA P-256, SHA-256).

Good for tests and pilots; in production each organisation's client certificate would come from the
federation operator's CA through its usual issuance process (the coordinator only needs the CA file).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["generate_pki"]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(out: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[str, str]:
    key_path, cert_path = out / f"{stem}.key", out / f"{stem}.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(cert_path), str(key_path)


def generate_pki(out_dir: str | Path, silos: list[str], hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                 days: int = 30) -> dict[str, tuple[str, str]]:
    """Writes ``ca``, ``server`` and one ``client-<silo>`` certificate/key pair into ``out_dir``.

    Args:
        out_dir: Output folder (created).
        silos: Silo names; each gets a client certificate whose CN is the name.
        hosts: DNS names / IP addresses of the coordinator (server certificate SANs).
        days: Validity.

    Returns:
        ``{"ca": (cert, key), "server": (cert, key), "<silo>": (cert, key), ...}`` as paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (x509.CertificateBuilder().subject_name(_name("fineray federation CA")).issuer_name(_name("fineray federation CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(until)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    paths = {"ca": _write(out, "ca", ca_key, ca_cert)}

    def leaf(cn: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName] | None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now).not_valid_after(until)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    paths["server"] = _write(out, "server", *leaf(hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, sans))
    for silo in silos:
        paths[silo] = _write(out, f"client-{silo}", *leaf(silo, ExtendedKeyUsageOID.CLIENT_AUTH, None))
    return paths
