"""Certificates for the tests' loopback servers: a CA of the test's own, and a certificate
for 127.0.0.1 that it signs (the registries of registry_helpers, the image servers of
simplestreams_helpers)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

# run in the TLS directory: a CA, and a certificate for 127.0.0.1 that it signs (Go and
# Python check the subjectAltName, never the CN); EC keys, as they are made in milliseconds
_OPENSSL = (
    "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.crt"
    " -days 2 -subj /CN=pytest-incus-test-CA -addext basicConstraints=critical,CA:TRUE"
    " -addext keyUsage=critical,keyCertSign,cRLSign",
    "req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout server.key -out server.csr"
    " -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1",
    "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2"
    " -copy_extensions copy -out server.crt",
)


def make_tls(tls: Path) -> None:
    """Make ``ca.crt`` and a server's ``server.crt`` and ``server.key`` (for 127.0.0.1) in
    the new directory ``tls``."""
    assert shutil.which("openssl"), "the tests' TLS servers need openssl: apt-get install openssl"
    tls.mkdir(mode=0o700)
    for command in _OPENSSL:
        proc = subprocess.run(
            ["openssl", *command.split()], cwd=tls, capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, f"openssl {command} failed: {proc.stderr}"
