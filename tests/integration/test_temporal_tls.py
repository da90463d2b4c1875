"""SHARDLINE_TEMPORAL_TLS* against a real TLS handshake.

`temporal server start-dev` speaks plaintext only, so a proxy on loopback terminates TLS (and asks
for a client certificate, as an mTLS-protected cluster does) in front of the session's dev server.
"""

import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from temporalio.api.workflowservice.v1 import GetSystemInfoRequest

from shardline.settings import Settings
from shardline.temporal import connect
from tests.conftest import Cluster
from tests.support.relay import Relay
from tests.support.waits import wait_node

SERVER_NAME = "temporal.test"
EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def make_pki(out: Path) -> None:
    """A CA, a server certificate for SERVER_NAME and a client certificate, both signed by it; and a stranger CA."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=out)

    for ca in ("ca", "stranger-ca"):
        openssl(
            "req", "-x509", *EC_KEY, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "1", "-subj", f"/CN={ca}"
        )
    leaves = {
        "server": f"subjectAltName=DNS:{SERVER_NAME}\nextendedKeyUsage=serverAuth",
        "client": "extendedKeyUsage=clientAuth",
    }
    for name, ext in leaves.items():
        (out / f"{name}.ext").write_text(f"basicConstraints=CA:FALSE\n{ext}\n")
        openssl("req", "-new", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")  # fmt: skip


def server_tls(pki: Path) -> ssl.SSLContext:
    """What an mTLS-protected cluster's frontend does: HTTP/2 over TLS, a client certificate required."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki / "ca.pem")
    context.load_cert_chain(pki / "server.pem", pki / "server.key")
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2"])
    return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    make_pki(out)
    return out


@pytest.fixture(scope="module")
def proxy(cluster: Cluster, pki: Path) -> Iterator[Relay]:
    p = Relay(cluster.temporal_port, tls=server_tls(pki)).start()
    yield p
    p.stop()


def tls_env(proxy: Relay, pki: Path, **files: str | None) -> dict[str, str]:
    """The environment of a process that reaches Temporal through the proxy; `files` override ca/cert/key names."""
    names = {"ca": "ca.pem", "cert": "client.pem", "key": "client.key", **files}
    env = {
        "SHARDLINE_TEMPORAL_ADDRESS": f"127.0.0.1:{proxy.port}",
        "SHARDLINE_TEMPORAL_TLS": "true",
        "SHARDLINE_TEMPORAL_TLS_SERVER_NAME": names.pop("server_name", None) or SERVER_NAME,
    }
    return env | {f"SHARDLINE_TEMPORAL_TLS_{k.upper()}": str(pki / v) for k, v in names.items() if v}


def tls_settings(proxy: Relay, pki: Path, **files: str | None) -> Settings:
    return Settings(**{k.removeprefix("SHARDLINE_").lower(): v for k, v in tls_env(proxy, pki, **files).items()})


async def test_a_client_connects_over_mtls(proxy: Relay, pki: Path) -> None:
    over_tls = await connect(tls_settings(proxy, pki))
    info = await over_tls.workflow_service.get_system_info(GetSystemInfoRequest())
    assert info.server_version  # the dev server behind the proxy answered


async def test_a_node_worker_joins_over_mtls(
    cluster: Cluster, api: httpx.AsyncClient, node_id: str, proxy: Relay, pki: Path
) -> None:
    cluster.start_node(node_id, **tls_env(proxy, pki))
    await wait_node(api, node_id, "online")


@pytest.mark.parametrize(
    "wrong",
    [
        {"cert": None, "key": None},  # the server wants a client certificate
        {"server_name": "other.test"},  # not the name on the server's certificate
        {"ca": "stranger-ca.pem"},  # a CA that did not sign the server's certificate
    ],
)
async def test_the_handshake_refuses_what_it_should(proxy: Relay, pki: Path, wrong: dict[str, str | None]) -> None:
    with pytest.raises(RuntimeError, match="Failed client connect"):
        await connect(tls_settings(proxy, pki, **wrong))
