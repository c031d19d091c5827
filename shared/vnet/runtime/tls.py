"""A local certificate authority for NATS over TLS (node workers on other machines).

``vnetctl up`` with ``stack_tls`` on (``VNET_STACK_TLS=true``) calls :func:`ensure_ca`
and :func:`ensure_server_cert`: the state directory's ``tls/`` then holds::

    ca.pem, ca.key           the stack's own CA (the key never leaves this directory)
    server.pem, server.key   nats-server's certificate: 127.0.0.1, localhost, this host's name

Clients verify the server with ``nats_tls_ca`` (``ca.pem``, copied to the other machine);
``vnetctl`` and the stack's own processes get it by themselves. Made with the ``openssl``
command (OpenSSL 1.1.1 or later), so no Python package is needed; every file is 0600.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import subprocess
from collections.abc import Iterable
from pathlib import Path

from vnet.runtime.credentials import DIR_MODE, FILE_MODE

TLS_DIR = "tls"
CA_DAYS = 3650
CERT_DAYS = 825  # what browsers and most clients accept for a leaf


class TLSError(Exception):
    pass


def _openssl() -> str:
    found = shutil.which("openssl")
    if not found:
        raise TLSError("the `openssl` command is needed to make the stack's TLS certificates "
                       "(apt-get install openssl), or turn stack_tls off")
    return found


def _run(args: list[str], cwd: Path) -> None:
    res = subprocess.run([_openssl(), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    if res.returncode != 0:
        raise TLSError(f"openssl {args[0]} failed: {res.stderr.strip()[-500:]}")


def tls_dir(state_dir: Path) -> Path:
    d = state_dir / TLS_DIR
    d.mkdir(mode=DIR_MODE, exist_ok=True)
    return d


def ensure_ca(state_dir: Path) -> Path:
    """The stack's CA certificate (made once); returns the path of ``ca.pem``."""
    d = tls_dir(state_dir)
    ca = d / "ca.pem"
    if not (ca.exists() and (d / "ca.key").exists()):
        _run(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
              "-keyout", "ca.key", "-out", "ca.pem", "-days", str(CA_DAYS), "-subj", "/CN=VNet local stack CA",
              "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"], d)
    for f in ("ca.pem", "ca.key"):
        (d / f).chmod(FILE_MODE)
    return ca


def default_names() -> list[str]:
    names = ["127.0.0.1", "::1", "localhost"]
    host = socket.gethostname()
    if host and host not in names:
        names.append(host)
    return names


def ensure_server_cert(state_dir: Path, names: Iterable[str] | None = None) -> tuple[Path, Path]:
    """nats-server's certificate and key, signed by the stack's CA, for ``names`` (IP addresses
    and DNS names; default :func:`default_names`). Made again when the names change."""
    d = tls_dir(state_dir)
    ensure_ca(state_dir)
    names = list(names or default_names())
    san = []
    for n in names:
        try:
            ipaddress.ip_address(n)
            san.append(f"IP:{n}")
        except ValueError:
            san.append(f"DNS:{n}")
    want = ",".join(san)
    stamp = d / "server.names"
    cert, key = d / "server.pem", d / "server.key"
    if not (cert.exists() and key.exists() and stamp.exists() and stamp.read_text() == want):
        ext = d / "server.ext"
        ext.write_text(f"subjectAltName={want}\nextendedKeyUsage=serverAuth,clientAuth\n"
                       "keyUsage=critical,digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n")
        _run(["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "server.key",
              "-out", "server.csr", "-subj", "/CN=vnet-nats"], d)
        _run(["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
              "-out", "server.pem", "-days", str(CERT_DAYS), "-extfile", "server.ext"], d)
        stamp.write_text(want)
        for tmp in ("server.csr", "server.ext"):
            (d / tmp).unlink(missing_ok=True)
    for f in d.iterdir():
        f.chmod(FILE_MODE)
    return cert, key


def nats_tls_block(state_dir: Path, names: Iterable[str] | None = None) -> dict[str, str]:
    """The ``tls { ... }`` settings of nats-server for the stack (server auth; clients prove
    who they are with their NATS user, not with a certificate)."""
    cert, key = ensure_server_cert(state_dir, names)
    return {"cert_file": str(cert), "key_file": str(key), "ca_file": str(tls_dir(state_dir) / "ca.pem")}
