"""TLS on both ends: the server's --tls-cert/--tls-key/--tls-client-ca and the client's TLS options,
with a CA made for the test (trustme)."""

from __future__ import annotations

import grpc
import pytest
import trustme

from batchgate import NO_RETRIES, TLS, AsyncBatchgateClient, UnavailableError
from batchgate_server.app import BatchgateServer, server_credentials
from batchgate_server.config import ConfigError
from batchgate_server.settings import build_parser, settings_from_args
from tests.conftest import MASTER_KEY, make_settings, start_harness, stop_harness


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pems(ca, tmp_path):
    """Paths of the CA, a server certificate for 127.0.0.1 and batchgate.test, and a client one."""
    server = ca.issue_cert("127.0.0.1", "localhost", "batchgate.test")
    client = ca.issue_cert("client@batchgate.test")
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key", "client_cert", "client_key")}
    ca.cert_pem.write_to_path(paths["ca"])
    paths["cert"].write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    server.private_key_pem.write_to_path(paths["key"])
    paths["client_cert"].write_bytes(b"".join(blob.bytes() for blob in client.cert_chain_pems))
    client.private_key_pem.write_to_path(paths["client_key"])
    return paths


async def _list(port: int, *, host: str = "127.0.0.1", tls: TLS | None = None) -> list:
    async with AsyncBatchgateClient(f"{host}:{port}", MASTER_KEY, tls=tls, retry=NO_RETRIES, timeout=10) as bg:
        return [f async for f in bg.list_files()]


async def _server(tmp_path, pems, *, mutual: bool):
    return await start_harness(tmp_path / "data", tls_cert=pems["cert"], tls_key=pems["key"],
                               tls_client_ca=pems["ca"] if mutual else None)


async def test_tls_server_serves_a_client_that_trusts_its_ca_and_refuses_plaintext(tmp_path, pems):
    h = await _server(tmp_path, pems, mutual=False)
    try:
        assert await _list(h.port, tls=TLS(root_certificates=pems["ca"])) == []
        with pytest.raises(UnavailableError):
            await _list(h.port)  # plaintext
        with pytest.raises(UnavailableError):
            await _list(h.port, tls=TLS())  # the system's CAs do not know the test CA
    finally:
        await stop_harness(h)


async def test_server_name_override_checks_the_certificate_against_another_name(tmp_path, ca, pems):
    only_named = ca.issue_cert("batchgate.test")
    only_named.private_key_and_cert_chain_pem.write_to_path(tmp_path / "named.pem")
    h = await start_harness(tmp_path / "data", tls_cert=tmp_path / "named.pem", tls_key=tmp_path / "named.pem")
    try:
        with pytest.raises(UnavailableError):
            await _list(h.port, tls=TLS(root_certificates=pems["ca"]))  # 127.0.0.1 is not in the certificate
        assert await _list(h.port, tls=TLS(root_certificates=pems["ca"], server_name="batchgate.test")) == []
    finally:
        await stop_harness(h)


async def test_mutual_tls_needs_a_client_certificate_from_the_client_ca(tmp_path, pems):
    h = await _server(tmp_path, pems, mutual=True)
    other_ca = trustme.CA().issue_cert("client@elsewhere.test")
    (tmp_path / "other.pem").write_bytes(other_ca.private_key_and_cert_chain_pem.bytes())
    try:
        trusted = TLS(root_certificates=pems["ca"], client_certificate=pems["client_cert"],
                      client_key=pems["client_key"])
        assert await _list(h.port, tls=trusted) == []
        with pytest.raises(UnavailableError):
            await _list(h.port, tls=TLS(root_certificates=pems["ca"]))  # no client certificate
        with pytest.raises(UnavailableError):
            await _list(h.port, tls=TLS(root_certificates=pems["ca"], client_certificate=tmp_path / "other.pem",
                                        client_key=tmp_path / "other.pem"))
        with pytest.raises(UnavailableError):
            await _list(h.port)
    finally:
        await stop_harness(h)


def test_tls_flags_come_from_the_environment(monkeypatch, pems):
    monkeypatch.setenv("BATCHGATE_TLS_CERT", str(pems["cert"]))
    monkeypatch.setenv("BATCHGATE_TLS_KEY", str(pems["key"]))
    monkeypatch.setenv("BATCHGATE_TLS_CLIENT_CA", str(pems["ca"]))
    s = settings_from_args(build_parser().parse_args([]))
    assert (s.tls_cert, s.tls_key, s.tls_client_ca) == (pems["cert"], pems["key"], pems["ca"])
    assert isinstance(server_credentials(s), grpc.ServerCredentials)
    flags = settings_from_args(build_parser().parse_args(["--tls-key", "/k.pem"]))
    assert flags.tls_key.name == "k.pem"


@pytest.mark.parametrize("given, message", [
    (dict(tls_cert="cert"), "both --tls-cert and --tls-key"),
    (dict(tls_key="key"), "both --tls-cert and --tls-key"),
    (dict(tls_client_ca="ca"), "--tls-client-ca needs --tls-cert"),
    (dict(tls_cert="cert", tls_key="missing"), "--tls-key"),
])
def test_incomplete_or_missing_tls_files_are_a_configuration_error(tmp_path, pems, given, message):
    paths = {k: pems[v] if v in pems else tmp_path / "missing.pem" for k, v in given.items()}
    with pytest.raises(ConfigError, match=message):
        server_credentials(make_settings(tmp_path, **paths))


def test_client_tls_from_the_environment(pems):
    env = {"BATCHGATE_TLS_CA": str(pems["ca"]), "BATCHGATE_TLS_SERVER_NAME": "batchgate.test"}
    assert TLS.from_env(env) == TLS(root_certificates=str(pems["ca"]), server_name="batchgate.test")
    assert TLS.from_env({"BATCHGATE_TLS": "1"}) == TLS()
    assert TLS.from_env({}) is None
    with pytest.raises(ValueError, match="both a client certificate and its key"):
        TLS(client_certificate=pems["client_cert"]).credentials()


async def test_a_certificate_that_is_not_pem_stops_start_up_naming_the_flags(tmp_path, pems):
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    server = BatchgateServer(make_settings(tmp_path / "data", tls_cert=tmp_path / "bad.pem", tls_key=pems["key"]))
    try:
        with pytest.raises(ConfigError, match="--tls-cert and --tls-key must be PEM"):
            await server.start()
    finally:
        await server.stop(grace=0)
