"""The replica channel's pieces without processes: the secret, the proofs,
the frame cap before a peer is trusted, the TLS contexts, the config section."""

from __future__ import annotations

import ssl
import struct
from pathlib import Path

import pytest
from tls_certs import CertificateAuthority

from muxgate.gateway._config import parse_config
from muxgate.replicas._channel import (
    MIN_SECRET_BYTES,
    NONCE_BYTES,
    SECRET_ENV,
    ChannelAuth,
    ChannelError,
    TlsSettings,
    client_ssl_context,
    is_loopback_host,
    load_secret,
    server_ssl_context,
)
from muxgate.replicas._protocol import (
    HANDSHAKE_MAX_FRAME_BYTES,
    FrameDecoder,
    Hello,
    ProtocolError,
    encode_frame,
)

SECRET = b"s" * 32


def test_secret_from_file_wins_over_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("from-the-file-0123456789\n")
    env = {SECRET_ENV: "from-the-environment-0123"}
    assert load_secret(str(path), env) == b"from-the-file-0123456789"
    assert load_secret(None, env) == b"from-the-environment-0123"
    assert load_secret(None, {}) is None


def test_unusable_secrets_are_errors_that_do_not_show_the_secret(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("hunter2")
    with pytest.raises(ChannelError, match="holds 7 bytes") as info:
        load_secret(str(short), {})
    assert "hunter2" not in str(info.value)
    with pytest.raises(ChannelError, match=f"\\${SECRET_ENV} holds 0 bytes"):
        load_secret(None, {SECRET_ENV: "  \n"})
    with pytest.raises(ChannelError, match="cannot read the cluster secret file"):
        load_secret(str(tmp_path / "missing"), {})
    with pytest.raises(ChannelError):
        ChannelAuth(b"x" * (MIN_SECRET_BYTES - 1))


def test_proofs_bind_secret_role_and_both_nonces() -> None:
    auth = ChannelAuth(SECRET)
    g, r = auth.nonce(), auth.nonce()
    assert len(g) == NONCE_BYTES and g != r
    proof = auth.proof("gateway", g, r)
    assert auth.verify("gateway", g, r, proof)
    # the replica's proof is not the gateway's (no reflection)
    assert not auth.verify("replica", g, r, proof)
    assert not auth.verify("gateway", r, g, proof)
    assert not auth.verify("gateway", g, auth.nonce(), proof)
    assert not ChannelAuth(b"t" * 32).verify("gateway", g, r, proof)
    assert not auth.verify("gateway", g[:-1], r, proof)
    assert not auth.verify("gateway", g, r, proof[:-1])
    assert repr(auth) == "<ChannelAuth secret=***>"


def test_frame_cap_is_enforced_from_the_length_prefix_alone() -> None:
    decoder = FrameDecoder(max_frame=HANDSHAKE_MAX_FRAME_BYTES)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decoder.feed(struct.pack(">I", 0xFFFFFFFF))
    decoder = FrameDecoder(max_frame=HANDSHAKE_MAX_FRAME_BYTES)
    assert decoder.feed(encode_frame(Hello(version=2, nonce=b"n" * NONCE_BYTES))) == [
        Hello(version=2, nonce=b"n" * NONCE_BYTES)
    ]
    with pytest.raises(ProtocolError):
        decoder.feed(struct.pack(">I", HANDSHAKE_MAX_FRAME_BYTES + 1))


def test_hello_without_nonce_is_the_plain_hello() -> None:
    # A gateway without a secret sends what earlier releases sent.
    plain = encode_frame(Hello(version=2))
    assert b"nonce" not in plain
    assert FrameDecoder().feed(plain) == [Hello(version=2, nonce=b"")]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.4.5", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("10.0.0.7", False),
        ("::", False),
        ("replica-0.muxgate", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_tls_contexts(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    leaf = ca.issue("replica")
    server = server_ssl_context(TlsSettings(ca=ca.ca, cert=leaf.cert, key=leaf.key, mutual=True))
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert server_ssl_context(TlsSettings(cert=leaf.cert, key=leaf.key)).verify_mode == (
        ssl.CERT_NONE
    )
    client = client_ssl_context(TlsSettings(ca=ca.ca))
    assert client.check_hostname and client.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ChannelError, match="needs both cert and key"):
        server_ssl_context(TlsSettings(ca=ca.ca))
    with pytest.raises(ChannelError, match="mutual needs ca"):
        server_ssl_context(TlsSettings(cert=leaf.cert, key=leaf.key, mutual=True))
    with pytest.raises(ChannelError, match="cannot load the TLS CA file"):
        client_ssl_context(TlsSettings(ca=str(tmp_path / "nope.crt")))
    with pytest.raises(ChannelError, match="cannot load the TLS certificate"):
        client_ssl_context(TlsSettings(ca=ca.ca, cert=leaf.key, key=leaf.key, mutual=True))


def test_cluster_section_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    config = parse_config(
        {
            "deployments": [{"name": "A", "import_path": "m:A"}],
            "cluster": {
                "secret_file": "secret",
                "tls": {"ca": "ca.crt", "cert": "/abs/r.crt", "key": "r.key", "mutual": True},
                "handshake_timeout_s": 2.5,
            },
        },
        base_dir=str(tmp_path),
    )
    assert config.cluster.secret_file == str(tmp_path / "secret")
    assert config.cluster.tls is not None
    assert config.cluster.tls.ca == str(tmp_path / "ca.crt")
    assert config.cluster.tls.cert == "/abs/r.crt"
    assert config.cluster.tls.mutual is True
    assert config.cluster.handshake_timeout_s == 2.5
    # no cluster section: no secret file, no TLS
    bare = parse_config({"deployments": [{"name": "A", "import_path": "m:A"}]})
    assert bare.cluster.secret_file is None and bare.cluster.tls is None
