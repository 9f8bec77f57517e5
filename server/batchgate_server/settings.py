"""Server settings: command-line flags, each with a BATCHGATE_* environment fallback."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1024 * 1024


@dataclass
class Settings:
    address: str = "127.0.0.1:50051"
    http_address: str = ""  # the OpenAI-compatible HTTP API: off unless set
    data_dir: Path = Path("./data")
    # Empty: SQLite and local disk in data_dir (store/urls.py). A database URL may hold a password.
    database_url: str = field(default="", repr=False)
    blob_url: str = ""
    config_file: Path | None = None
    price_file: Path | None = None
    master_key: str = field(default="", repr=False)
    max_file_bytes: int = 200 * MIB
    max_file_lines: int = 50_000
    max_chunk_bytes: int = 2 * MIB
    upload_idle_timeout: float = 60.0
    max_uploads_per_project: int = 8
    # Processes validating uploads beside the event loop (core/upload_validation.py); 0: on the loop.
    upload_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    expiry_sweep_interval: float = 60.0
    heartbeat_interval: float = 15.0
    grace_period: float = 10.0
    log_level: str = "INFO"
    tls_cert: Path | None = None  # PEM certificate chain: serve TLS instead of plaintext
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # PEM CAs: require a client certificate they signed (mutual TLS)
    metrics_address: str = ""  # Prometheus /metrics listener: off unless set
    log_format: str = "text"  # text | json
    # HTTP/2 keepalive: a ping every keepalive_time seconds on a quiet connection keeps a long
    # WatchBatch alive through load balancers' idle timeouts (60 s on many) and finds dead peers.
    keepalive_time: float = 30.0
    keepalive_timeout: float = 10.0
    # 0: off. Set, connections are closed (GOAWAY) after this age so a load balancer can spread
    # them again; calls in flight get max_connection_age_grace seconds to end.
    max_connection_age: float = 0.0
    max_connection_age_grace: float = 30.0
    deployment_health_interval: float = 60.0  # seconds between health probes of each deployment; 0: off
    # Seconds after each failed webhook attempt until the next (Standard Webhooks' schedule).
    webhook_retry_schedule: tuple[float, ...] = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
    webhook_timeout: float = 15.0
    # Replicas (core/ownership.py): seconds a replica's batches stay its own after its last heartbeat.
    lease_timeout: float = 15.0

    @property
    def shared(self) -> bool:
        """Other replicas may share the stores: a database URL is given."""
        return bool(self.database_url)

    @property
    def work_dir(self) -> Path:
        return self.data_dir / "work"


def _env(name: str, default: str) -> str:
    return os.environ.get(f"BATCHGATE_{name}", default)


def _path_env(name: str) -> Path | None:
    return Path(v) if (v := _env(name, "")) else None


def _seconds_flag(p: argparse.ArgumentParser, defaults: Settings, flag: str, help: str) -> None:
    """A flag of seconds named like its Settings field, with its BATCHGATE_* environment fallback."""
    name = flag.removeprefix("--").replace("-", "_")
    p.add_argument(flag, type=float, default=float(_env(name.upper(), str(getattr(defaults, name)))),
                   help=f"{help} [BATCHGATE_{name.upper()}]")


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(prog="batchgate-server", description="Run the batchgate gRPC server.",
                                add_help=add_help)
    p.add_argument("--address", default=_env("ADDRESS", d.address), help="host:port to listen on [BATCHGATE_ADDRESS]")
    p.add_argument("--http-address", default=_env("HTTP_ADDRESS", d.http_address),
                   help="host:port of the OpenAI-compatible HTTP API; off when empty [BATCHGATE_HTTP_ADDRESS]")
    p.add_argument("--data-dir", type=Path, default=Path(_env("DATA_DIR", str(d.data_dir))),
                   help="SQLite database and file blobs (by default), executor work files [BATCHGATE_DATA_DIR]")
    p.add_argument("--database-url", default=_env("DATABASE_URL", d.database_url),
                   help="metadata database: sqlite:///abs/path.sqlite3 or postgresql://user:pass@host:port/db;"
                        " default SQLite in the data dir [BATCHGATE_DATABASE_URL]")
    p.add_argument("--blob-url", default=_env("BLOB_URL", d.blob_url),
                   help="file blobs: file:///abs/path, s3://bucket/prefix or gs://bucket/prefix; default the"
                        " data dir [BATCHGATE_BLOB_URL]")
    p.add_argument("--config", dest="config_file", type=Path, default=_path_env("CONFIG"),
                   help="YAML config with a LiteLLM-style model_list [BATCHGATE_CONFIG]")
    p.add_argument("--prices", dest="price_file", type=Path, default=_path_env("PRICES"),
                   help="JSON/YAML price table merged over the built-in one [BATCHGATE_PRICES]")
    p.add_argument("--max-file-bytes", type=int, default=int(_env("MAX_FILE_BYTES", str(d.max_file_bytes))),
                   help="largest accepted upload [BATCHGATE_MAX_FILE_BYTES]")
    p.add_argument("--max-file-lines", type=int, default=int(_env("MAX_FILE_LINES", str(d.max_file_lines))),
                   help="most request lines in a batch file [BATCHGATE_MAX_FILE_LINES]")
    p.add_argument("--upload-idle-timeout", type=float,
                   default=float(_env("UPLOAD_IDLE_TIMEOUT", str(d.upload_idle_timeout))),
                   help="seconds an upload may wait between two messages before it is aborted"
                        " [BATCHGATE_UPLOAD_IDLE_TIMEOUT]")
    p.add_argument("--max-uploads-per-project", type=int,
                   default=int(_env("MAX_UPLOADS_PER_PROJECT", str(d.max_uploads_per_project))),
                   help="uploads one project may run at once, unless its quota sets max_uploads"
                        " [BATCHGATE_MAX_UPLOADS_PER_PROJECT]")
    p.add_argument("--upload-workers", type=_count, default=_count(_env("UPLOAD_WORKERS", str(d.upload_workers))),
                   help="processes that validate uploads beside the event loop, started as uploads need"
                        " them; 0 validates on the event loop [BATCHGATE_UPLOAD_WORKERS]")
    p.add_argument("--heartbeat-interval", type=float,
                   default=float(_env("HEARTBEAT_INTERVAL", str(d.heartbeat_interval))),
                   help="seconds between WatchBatch heartbeats on an idle stream [BATCHGATE_HEARTBEAT_INTERVAL]")
    p.add_argument("--expiry-sweep-interval", type=float,
                   default=float(_env("EXPIRY_SWEEP_INTERVAL", str(d.expiry_sweep_interval))),
                   help="seconds between sweeps deleting expired files [BATCHGATE_EXPIRY_SWEEP_INTERVAL]")
    p.add_argument("--log-level", default=_env("LOG_LEVEL", d.log_level),
                   help="DEBUG, INFO, WARNING or ERROR [BATCHGATE_LOG_LEVEL]")
    p.add_argument("--log-format", choices=("text", "json"), default=_env("LOG_FORMAT", d.log_format),
                   help="text lines, or one JSON object a line with batch_id, file_id, project and deployment"
                        " where known [BATCHGATE_LOG_FORMAT]")
    p.add_argument("--metrics-address", default=_env("METRICS_ADDRESS", d.metrics_address),
                   help="host:port serving Prometheus metrics at /metrics; off when empty"
                        " [BATCHGATE_METRICS_ADDRESS]")
    _seconds_flag(p, d, "--keepalive-time", "seconds between HTTP/2 keepalive pings on a quiet connection; 0 turns"
                                            " them off")
    _seconds_flag(p, d, "--keepalive-timeout", "seconds to wait for a ping's answer before the connection is closed")
    _seconds_flag(p, d, "--max-connection-age", "close connections after this many seconds so load balancers can"
                                                " rebalance; 0: never")
    _seconds_flag(p, d, "--max-connection-age-grace", "seconds calls in flight may go on after --max-connection-age")
    p.add_argument("--tls-cert", type=Path, default=_path_env("TLS_CERT"),
                   help="PEM certificate chain: serve TLS (plaintext is then refused) [BATCHGATE_TLS_CERT]")
    p.add_argument("--tls-key", type=Path, default=_path_env("TLS_KEY"),
                   help="PEM private key of --tls-cert [BATCHGATE_TLS_KEY]")
    p.add_argument("--tls-client-ca", type=Path, default=_path_env("TLS_CLIENT_CA"),
                   help="PEM CA certificates: require client certificates they signed (mutual TLS)"
                        " [BATCHGATE_TLS_CLIENT_CA]")
    _seconds_flag(p, d, "--deployment-health-interval", "seconds between health probes (a models list) of each"
                                                        " deployment, backed off while it fails; 0 turns them off")
    p.add_argument("--webhook-retry-schedule", type=_seconds_list,
                   default=_seconds_list(_env("WEBHOOK_RETRY_SCHEDULE", ",".join(f"{x:g}" for x in d.webhook_retry_schedule))),
                   help="comma-separated seconds after each failed webhook attempt until the next; after the last"
                        " one the event is given up [BATCHGATE_WEBHOOK_RETRY_SCHEDULE]")
    p.add_argument("--webhook-timeout", type=float, default=float(_env("WEBHOOK_TIMEOUT", str(d.webhook_timeout))),
                   help="seconds a webhook endpoint has to answer an attempt [BATCHGATE_WEBHOOK_TIMEOUT]")
    p.add_argument("--lease-timeout", type=float, default=float(_env("LEASE_TIMEOUT", str(d.lease_timeout))),
                   help="seconds after a replica's last heartbeat before other replicas take its batches over"
                        " [BATCHGATE_LEASE_TIMEOUT]")
    return p


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _seconds_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated seconds, got {text!r}") from None
    if any(not 0 <= v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"seconds must be finite and >= 0, got {text!r}")
    return values


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(
        address=args.address,
        http_address=args.http_address,
        data_dir=args.data_dir,
        database_url=args.database_url,
        blob_url=args.blob_url,
        config_file=args.config_file,
        price_file=args.price_file,
        master_key=os.environ.get("BATCHGATE_MASTER_KEY", ""),
        max_file_bytes=args.max_file_bytes,
        max_file_lines=args.max_file_lines,
        upload_idle_timeout=args.upload_idle_timeout,
        max_uploads_per_project=args.max_uploads_per_project,
        upload_workers=args.upload_workers,
        heartbeat_interval=args.heartbeat_interval,
        expiry_sweep_interval=args.expiry_sweep_interval,
        log_level=args.log_level,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        metrics_address=args.metrics_address,
        log_format=args.log_format,
        keepalive_time=args.keepalive_time,
        keepalive_timeout=args.keepalive_timeout,
        max_connection_age=args.max_connection_age,
        max_connection_age_grace=args.max_connection_age_grace,
        deployment_health_interval=args.deployment_health_interval,
        webhook_retry_schedule=args.webhook_retry_schedule,
        webhook_timeout=args.webhook_timeout,
        lease_timeout=args.lease_timeout,
    )
