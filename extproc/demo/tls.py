"""A self-signed certificate for the demo's TLS listener (:8443), generated on this machine.

`python -m extproc.demo.tls [DIR]` writes DIR/server.crt and DIR/server.key (default
.extproc/tls, which envoy/envoy.yaml reads relative to Envoy's working directory, the project
root), for localhost and 127.0.0.1, valid 90 days; an existing pair with more than 7 days left is
kept. Never committed: scripts/setup makes it. Production mounts a real certificate at the same
path (or edits the two filenames in envoy.yaml).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

DEFAULT_DIR = Path(".extproc") / "tls"


def ensure(directory: Path = DEFAULT_DIR, days: int = 90) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    crt, key = directory / "server.crt", directory / "server.key"
    now = dt.datetime.now(dt.UTC)
    if crt.exists() and key.exists():
        try:
            cert = x509.load_pem_x509_certificate(crt.read_bytes())
            if cert.not_valid_after_utc - now > dt.timedelta(days=7):
                return crt, key
        except ValueError:
            pass
    directory.mkdir(parents=True, exist_ok=True)
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(private, hashes.SHA256()))
    for path, data, mode in ((key, private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()), 0o600),
                             (crt, cert.public_bytes(serialization.Encoding.PEM), 0o644)):
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return crt, key


if __name__ == "__main__":
    out = ensure(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR)
    print(" ".join(str(p) for p in out))
