"""Module signing for the kernel tests, as the kernel does it: scripts/sign-file
built from the lab's 6.12 source, a key made as certs/Makefile makes one, and
the signature sign-file appends (PKCS#7, struct module_signature, the magic)
taken apart again to check it."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

from kbuild_bolt.lab.kernels import kernel_source
from kbuild_bolt.rewrite.module import SIGNATURE_MAGIC

SIGNER = "kbuild-bolt test signing key"
X509_GENKEY = f"""[ req ]
default_bits = 2048
distinguished_name = req_distinguished_name
prompt = no
x509_extensions = myexts
[ req_distinguished_name ]
CN = {SIGNER}
[ myexts ]
basicConstraints=critical,CA:FALSE
keyUsage=digitalSignature
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
"""


def build_sign_file(out: Path) -> Path:
    """The kernel tree's scripts/sign-file, compiled to ``out``."""
    source = kernel_source("6.12").tree
    subprocess.run(["gcc", "-o", str(out), str(source / "scripts/sign-file.c"), "-lcrypto"],
                   check=True, capture_output=True)
    return out


def make_signing_key(scratch: Path) -> Path:
    """A key with its certificate in one PEM file (certs/signing_key.pem's form)."""
    (scratch / "x509.genkey").write_text(X509_GENKEY)
    key = scratch / "signing_key.pem"
    subprocess.run(["openssl", "req", "-new", "-nodes", "-utf8", "-sha256", "-days", "36500",
                    "-batch", "-x509", "-config", str(scratch / "x509.genkey"), "-outform",
                    "PEM", "-out", str(key), "-keyout", str(key)], check=True,
                   capture_output=True)
    return key


def split_signature(data: bytes) -> tuple[bytes, bytes]:
    """(the signed bytes, the PKCS#7 signature) of a module sign-file signed."""
    assert data.endswith(SIGNATURE_MAGIC)
    tail = len(data) - len(SIGNATURE_MAGIC) - 12       # struct module_signature
    (sig_len,) = struct.unpack(">I", data[tail + 8:tail + 12])
    return data[:tail - sig_len], data[tail - sig_len:tail]


def signature_verifies(module: Path, key: Path, scratch: Path) -> bool:
    """The signature appended to ``module`` is ``key``'s signature of the bytes
    before it."""
    signed, signature = split_signature(module.read_bytes())
    content, pkcs7 = scratch / "content", scratch / "signature.p7"
    content.write_bytes(signed)
    pkcs7.write_bytes(signature)
    proc = subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER",
                           "-in", str(pkcs7), "-content", str(content), "-certfile",
                           str(key), "-nointern", "-noverify", "-out", "/dev/null"],
                          capture_output=True, text=True)
    return proc.returncode == 0
