"""Every SHARDLINE_* setting, read once at each entry point and passed down."""

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHARDLINE_", frozen=True)

    home: Path = Field(
        default=Path.home() / ".shardline",
        description="Data dir: node id, models, embedded Temporal database",
    )
    temporal_address: str | None = Field(
        default=None,
        description="host:port of an existing Temporal cluster; unset = the embedded dev server",
    )
    temporal_port: int = Field(default=7233, description="gRPC port of the embedded Temporal server")
    ui_port: int = Field(default=8233, description="Port of the embedded Temporal UI")
    temporal_ui_url: str | None = Field(
        default=None,
        description="Temporal UI the dashboard links workflows to; unset = http://127.0.0.1:<ui_port>",
    )
    namespace: str = Field(default="default", description="Temporal namespace")
    temporal_tls: bool = Field(default=False, description="Reach SHARDLINE_TEMPORAL_ADDRESS over TLS")
    temporal_tls_ca: Path | None = Field(
        default=None, description="PEM CA the server's certificate must chain to; unset = the system's roots"
    )
    temporal_tls_cert: Path | None = Field(
        default=None, description="PEM client certificate for mTLS; needs SHARDLINE_TEMPORAL_TLS_KEY"
    )
    temporal_tls_key: Path | None = Field(default=None, description="PEM private key of the client certificate")
    temporal_tls_server_name: str | None = Field(
        default=None,
        description="Name (and SNI) the server's certificate is checked against; unset = the address's host",
    )
    node_id: str | None = Field(
        default=None,
        description="This node's id; unset = generated once and kept in <home>/node_id",
    )
    node_host: str | None = Field(
        default=None,
        description="Address other nodes reach this node's runners at; unset = this machine's address on its route "
        "to Temporal (127.0.0.1 when Temporal is on loopback)",
    )
    node_memory: int | None = Field(
        default=None, gt=0, description="Bytes of memory shards may use here; unset = what is free"
    )
    load_timeout: float = Field(default=600.0, gt=0, description="Seconds a runner may take to load and join its peers")
    runner_blas: str = Field(
        default="auto",
        description="BLAS for MLX runners on Linux: auto (cmeel-openblas if installed), reference, or a path",
    )
    runner_ring_wait: Literal["poll", "spin"] = Field(
        default="poll",
        description="How a runner on Linux waits for its ring peers: poll (sleeps until data comes; a 1 KB shim "
        "built once with the C compiler) or spin (MLX's own loop: a core busy per waiting rank)",
    )
    runner_fork: bool = Field(
        default=True,
        description="Linux: fork runners from one process per node that has imported MLX and the engine already "
        "(a runner starts about 1 s sooner, without that CPU); false: each runner is a new Python process",
    )
    api_host: str = Field(default="127.0.0.1", description="Address the HTTP API binds")
    api_port: int = Field(default=8000, description="Port of the HTTP API")
    api_url: str | None = Field(
        default=None,
        description="API the CLI talks to; unset = http://127.0.0.1:<api_port>",
    )
    api_key: SecretStr | None = Field(default=None, description="Bearer key the API requires (unset = open)")
    heartbeat_timeout: float = Field(
        default=30.0,
        gt=0,
        description="Seconds without a heartbeat before a node (or its work) counts as gone",
    )
    node_grace: float = Field(
        default=600.0,
        gt=0,
        description="Seconds a node may stay offline before it is departed",
    )
    node_wait: float = Field(
        default=300.0,
        gt=0,
        description="Seconds node-bound work waits for its node to pick it up (each attempt)",
    )
    max_downloads: int = Field(default=4, ge=1, description="Downloads a node transfers at once; the rest queue")
    hub_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a hub call waits for a connection or its next bytes; a stalled transfer ends the attempt",
    )
    download_attempts: int = Field(default=5, ge=1, description="Attempts of a download before it fails")
    recovery_deadline: float = Field(
        default=1800.0, gt=0, description="Seconds a healing instance waits for room (a node back) before it fails"
    )
    max_batch: int = Field(default=32, ge=1, description="Requests a runner decodes together (rank 0's node decides)")
    max_queue: int = Field(
        default=256, ge=1, description="Requests waiting per instance before the runner answers 429 with Retry-After"
    )
    prompt_cache_bytes: int | None = Field(
        default=None,
        ge=0,
        description="Prefix-cache bytes per runner; unset = 1/8 of the node's memory (at most 8 GiB); 0 = off",
    )
    resume_timeout: float = Field(
        default=120.0,
        ge=0,
        description="Seconds a generation whose runner was lost waits (its client's stream kept open) for a ready "
        "instance of its model to go on from where it stopped",
    )
    resume_attempts: int = Field(
        default=3,
        ge=0,
        description="Times one generation is resumed after a lost runner before it fails; 0 = a lost runner's "
        "requests fail at once (503)",
    )
    route_slack: int = Field(
        default=4,
        ge=-1,
        description="How many more requests in flight than the least loaded instance of a model the instance that "
        "holds a request's prefix may have and still get it; -1 = every request to the least loaded",
    )
    runner_silence: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a runner may send nothing at all (it says it is alive every second) before the API "
        "counts it as lost (a frozen or cut-off node) and resumes its generations elsewhere",
    )
    log_level: str = Field(default="info", description="Log level")
    log_json: bool | None = Field(default=None, description="JSON logs; unset = JSON unless stderr is a terminal")
    metrics_port: int | None = Field(
        default=None,
        gt=0,
        lt=65536,
        description="Port a worker serves Temporal SDK Prometheus metrics on; unset = none (one port per process)",
    )
    metrics_host: str = Field(default="127.0.0.1", description="Address the workers' metrics port binds")
    lan: bool = Field(
        default=False,
        description="Same as `up --lan`: serve the embedded Temporal (and UI), the API and the runners on the LAN, "
        "and advertise the cluster by mDNS",
    )
    lan_host: str = Field(
        default="0.0.0.0",
        description="Address `up --lan` serves on and advertises; 0.0.0.0 = every interface (every LAN address)",
    )
    cluster: str | None = Field(
        default=None,
        description="Name `up --lan` advertises the cluster under, and the one a node joins among several found; "
        "unset = the host name (up), the only cluster found (node)",
    )
    discover_s: float = Field(
        default=3.0,
        ge=0,
        description="Seconds `shardline node` browses mDNS for a cluster when SHARDLINE_TEMPORAL_ADDRESS is unset; "
        "0 = none (127.0.0.1)",
    )

    @property
    def bind_host(self) -> str:
        """Where the embedded dev server (frontend and UI) listens."""
        return self.lan_host if self.lan else "127.0.0.1"

    @property
    def target(self) -> str:
        local = "127.0.0.1" if self.bind_host == "0.0.0.0" else self.bind_host
        return self.temporal_address or f"{local}:{self.temporal_port}"

    @property
    def embedded(self) -> bool:
        return self.temporal_address is None

    @property
    def api_base(self) -> str:
        return self.api_url or f"http://127.0.0.1:{self.api_port}"

    @property
    def temporal_ui(self) -> str:
        return (self.temporal_ui_url or f"http://127.0.0.1:{self.ui_port}").rstrip("/")

    @property
    def models_dir(self) -> Path:
        return self.home / "models"
