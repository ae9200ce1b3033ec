"""Throw-away TLS material for tests, made at test time with ``cryptography``: a CA, a server certificate for
127.0.0.1 / localhost (an IP SAN: gRPC checks the address it dialled against the certificate), and a client
certificate for mTLS. EC P-256 keys, so generating them takes milliseconds. PEM bytes throughout."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class TLSMaterial:
    ca: bytes                # the CA's certificate: the root clients (and an mTLS server) trust
    server_chain: bytes      # the server's certificate (SAN 127.0.0.1, ::1, localhost)
    server_key: bytes
    client_chain: bytes      # a client certificate signed by the same CA
    client_key: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def make_ca(common_name: str = "paramserver test CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    name = _name(common_name)
    cert = (
        _builder(name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str, server: bool) -> tuple[bytes, bytes]:
    key = _key()
    builder = (
        _builder(_name(common_name), ca.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
            ),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def make_tls_material() -> TLSMaterial:
    ca, ca_key = make_ca()
    server_chain, server_key = _leaf(ca, ca_key, "127.0.0.1", server=True)
    client_chain, client_key = _leaf(ca, ca_key, "paramserver test client", server=False)
    return TLSMaterial(ca.public_bytes(serialization.Encoding.PEM), server_chain, server_key, client_chain, client_key)


def make_other_client(common_name: str = "stranger") -> tuple[bytes, bytes, bytes]:
    """(CA, chain, key) of a client certificate from another CA: one an mTLS server must refuse."""
    ca, ca_key = make_ca("some other CA")
    chain, key = _leaf(ca, ca_key, common_name, server=False)
    return ca.public_bytes(serialization.Encoding.PEM), chain, key
