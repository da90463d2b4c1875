"""SHARDLINE_TEMPORAL_TLS*: the TLSConfig built from them, and the settings that cannot work."""

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from shardline.settings import Settings
from shardline.temporal import TemporalConfigError, connect, tls_config

ADDRESS = "temporal.example:7233"


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway self-signed certificate and its key, made by the openssl CLI."""
    if not shutil.which("openssl"):
        pytest.skip("the openssl CLI is missing")
    out = tmp_path_factory.mktemp("pem")
    cert, key = out / "cert.pem", out / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=temporal.example"],
        check=True, capture_output=True,
    )  # fmt: skip
    return {"cert": cert, "key": key}


def settings(**kw: object) -> Settings:
    return Settings(**{"temporal_address": ADDRESS, **kw})


def test_plaintext_by_default() -> None:
    assert tls_config(settings()) is None


def test_tls_alone_trusts_the_system_roots() -> None:
    config = tls_config(settings(temporal_tls=True))
    assert config is not None
    assert (config.server_root_ca_cert, config.client_cert, config.client_private_key, config.domain) == (None,) * 4


def test_ca_client_cert_key_and_server_name(pem: dict[str, Path]) -> None:
    config = tls_config(
        settings(
            temporal_tls=True,
            temporal_tls_ca=pem["cert"],
            temporal_tls_cert=pem["cert"],
            temporal_tls_key=pem["key"],
            temporal_tls_server_name="temporal.internal",
        )
    )
    assert config is not None
    assert config.server_root_ca_cert == pem["cert"].read_bytes()
    assert config.client_cert == pem["cert"].read_bytes()
    assert config.client_private_key == pem["key"].read_bytes()
    assert config.domain == "temporal.internal"


def test_settings_come_from_the_environment(pem: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDLINE_TEMPORAL_ADDRESS", ADDRESS)
    monkeypatch.setenv("SHARDLINE_TEMPORAL_TLS", "true")
    monkeypatch.setenv("SHARDLINE_TEMPORAL_TLS_CA", str(pem["cert"]))
    config = tls_config(Settings())
    assert config is not None
    assert config.server_root_ca_cert == pem["cert"].read_bytes()


@pytest.mark.parametrize("half", ["cert", "key"])
def test_client_cert_and_key_go_together(pem: dict[str, Path], half: str) -> None:
    with pytest.raises(TemporalConfigError, match="SHARDLINE_TEMPORAL_TLS_CERT and SHARDLINE_TEMPORAL_TLS_KEY"):
        tls_config(settings(temporal_tls=True, **{f"temporal_tls_{half}": pem[half]}))


@pytest.mark.parametrize("which", ["ca", "cert", "key"])
def test_a_missing_file_names_its_variable(pem: dict[str, Path], tmp_path: Path, which: str) -> None:
    files = {
        "temporal_tls_cert": pem["cert"],
        "temporal_tls_key": pem["key"],
        f"temporal_tls_{which}": tmp_path / "nope.pem",
    }
    with pytest.raises(TemporalConfigError, match=rf"SHARDLINE_TEMPORAL_TLS_{which.upper()}=.*nope\.pem: cannot read"):
        tls_config(settings(temporal_tls=True, **files))


def test_a_file_that_is_not_pem(tmp_path: Path) -> None:
    der = tmp_path / "ca.der"
    der.write_bytes(b"\x30\x82\x01\x0a not pem")
    with pytest.raises(TemporalConfigError, match=r"SHARDLINE_TEMPORAL_TLS_CA=.*not a PEM file"):
        tls_config(settings(temporal_tls=True, temporal_tls_ca=der))


def test_tls_files_without_tls_on(pem: dict[str, Path]) -> None:
    with pytest.raises(TemporalConfigError, match="SHARDLINE_TEMPORAL_TLS_CA set but SHARDLINE_TEMPORAL_TLS is not"):
        tls_config(settings(temporal_tls_ca=pem["cert"]))


def test_the_embedded_dev_server_cannot_do_tls() -> None:
    with pytest.raises(TemporalConfigError, match="needs SHARDLINE_TEMPORAL_ADDRESS"):
        tls_config(Settings(temporal_tls=True))


async def test_connect_fails_at_once_not_after_its_retries(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(TemporalConfigError, match="cannot read"):
        await connect(settings(temporal_tls=True, temporal_tls_ca=tmp_path / "nope.pem"), wait_s=60)
    assert time.monotonic() - started < 5
