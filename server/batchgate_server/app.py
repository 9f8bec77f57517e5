"""Wiring: stores, managers, tracker, servicers, reflection and health, in one object
that tests start in-process on port 0 and the CLI starts for real."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from batchgate.v1 import admin_pb2, admin_pb2_grpc, batch_pb2, file_pb2, file_pb2_grpc
from batchgate.v1 import usage_pb2, usage_pb2_grpc, webhook_pb2, webhook_pb2_grpc
from batchgate_server.api.admin import AdminServicer
from batchgate_server.api.batches import BatchServicer, add_batch_service
from batchgate_server.api.files import FileServicer
from batchgate_server.api.http.server import HttpServer, build_app
from batchgate_server.api.readiness import ReadinessGate
from batchgate_server.api.reflection import enable_reflection
from batchgate_server.api.undecodable import SoftDecoding
from batchgate_server.api.usage import UsageServicer
from batchgate_server.api.webhooks import WebhookServicer
from batchgate_server.config import ConfigError, is_secret_param, load_model_list
from batchgate_server.core.accounting import Accounting
from batchgate_server.core.admin import Admin
from batchgate_server.core.auth import Authenticator
from batchgate_server.core.deployment_health import DeploymentHealth
from batchgate_server.core.events import BatchEvents, EventFanout
from batchgate_server.core.batches import BatchManager
from batchgate_server.core.files import FileLimits, FileManager
from batchgate_server.core.ownership import Ownership, replica_id
from batchgate_server.core.pagination import PageTokens
from batchgate_server.core.quotas import Quotas
from batchgate_server.core.routing import Router
from batchgate_server.core.tracker import Tracker
from batchgate_server.core.upload_validation import ValidationWorkers
from batchgate_server.core.webhooks import Webhooks
from batchgate_server.core.usage import UsageReporter
from batchgate_server.core.watch_hub import WatchHub
from batchgate_server.observability import logs, tracing
from batchgate_server.pricing.table import PriceTable
from batchgate_server.providers.base import UnsupportedRequest
from batchgate_server.providers.registry import ProviderRegistry
from batchgate_server.settings import Settings
from batchgate_server.store.lock import DataDirInUse, DataDirLock
from batchgate_server.store.ports import BlobStore, MetadataStore
from batchgate_server.store.urls import Database, blob_url, database_url, open_blob_store, open_database

if TYPE_CHECKING:  # imported when metrics are on: prometheus_client costs start-up time
    from batchgate_server.observability.metrics import Metrics, MetricsServer

log = logging.getLogger(__name__)

# The health service's name for a deployment's own health (its provider's answer to a probe).
DEPLOYMENT_HEALTH_PREFIX = "batchgate.deployment/"

SERVICE_NAMES = (
    file_pb2.DESCRIPTOR.services_by_name["FileService"].full_name,
    batch_pb2.DESCRIPTOR.services_by_name["BatchService"].full_name,
    usage_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    webhook_pb2.DESCRIPTOR.services_by_name["WebhookService"].full_name,
)
# Streams carry up to 2 MiB chunks plus framing.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Seconds between reads of watched batches that another replica drives (see _watch_poll_interval).
WATCH_POLL_WITHOUT_FEED = 0.2
WATCH_POLL_UNDER_FEED = 1.0
# The name of the page-token signing key among the database's server secrets.
PAGE_TOKEN_SECRET = "page_tokens"


class StartupError(Exception):
    """The server cannot start as configured: its data directory or its address is taken."""


BIND_ERROR_UNKNOWN = "gRPC could not bind it"


def bind_error(address: str) -> str:
    """Why `address` cannot be listened on, as the operating system says it (gRPC only says
    that binding failed)."""
    host, _, port = address.rpartition(":")
    try:
        family, kind, proto, _, where = socket.getaddrinfo(host.strip("[]") or None, int(port),
                                                           type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.bind(where)
    except (OSError, ValueError) as err:
        return getattr(err, "strerror", None) or str(err)
    return BIND_ERROR_UNKNOWN


def loopback_only(address: str) -> str:
    """The same port on 127.0.0.1 when `address` would listen beyond this machine."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if host == "localhost":
        return address
    try:
        if ipaddress.ip_address(host).is_loopback:
            return address
    except ValueError:
        pass
    return f"127.0.0.1:{port}"


def server_credentials(s: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from --tls-cert/--tls-key (None: plaintext); with --tls-client-ca, clients
    must present a certificate signed by one of those CAs."""
    if s.tls_cert is None and s.tls_key is None:
        if s.tls_client_ca is not None:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        return None
    if s.tls_cert is None or s.tls_key is None:
        raise ConfigError("TLS needs both --tls-cert and --tls-key")

    def pem(flag: str, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as err:
            raise ConfigError(f"{flag} {path}: {err.strerror or err}") from None

    client_ca = pem("--tls-client-ca", s.tls_client_ca) if s.tls_client_ca is not None else None
    try:
        return grpc.ssl_server_credentials([(pem("--tls-key", s.tls_key), pem("--tls-cert", s.tls_cert))],
                                           root_certificates=client_ca, require_client_auth=client_ca is not None)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"TLS credentials rejected: {err}") from None


def grpc_options(s: Settings) -> list[tuple[str, int]]:
    """Message sizes, keepalive and connection age (--keepalive-*, --max-connection-age*)."""
    ms = lambda seconds: int(seconds * 1000)  # noqa: E731
    # gRPC sets SO_REUSEPORT by default: a second server would share the port and take half of
    # the connections.
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.so_reuseport", 0)]
    if s.keepalive_time > 0:
        options += [("grpc.keepalive_time_ms", ms(s.keepalive_time)),
                    ("grpc.keepalive_timeout_ms", ms(s.keepalive_timeout)),
                    ("grpc.keepalive_permit_without_calls", 1),
                    ("grpc.http2.max_pings_without_data", 0)]
    # Clients' own keepalive pings (the Python client's, a load balancer's health pings) are
    # welcome down to every 10 s; faster ones are answered with GOAWAY too_many_pings.
    options += [("grpc.http2.min_ping_interval_without_data_ms", 10_000)]
    if s.max_connection_age > 0:
        options += [("grpc.max_connection_age_ms", ms(s.max_connection_age)),
                    ("grpc.max_connection_age_grace_ms", ms(s.max_connection_age_grace))]
    return options


class BatchgateServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port: int = 0
        self.http_port: int = 0  # 0 while the HTTP API is off
        self._server: grpc.aio.Server | None = None
        self._http: HttpServer | None = None
        self._tasks: list[asyncio.Task] = []
        self.store: MetadataStore | None = None
        self._database: Database | None = None
        self._blobs: BlobStore | None = None
        self._data_lock: DataDirLock | None = None
        self.metrics: Metrics | None = None  # None while --metrics-address is empty
        self._metrics_server: MetricsServer | None = None
        self.metrics_port: int = 0
        self.ready = ReadinessGate()
        self._validation_workers: ValidationWorkers | None = None

    async def start(self) -> int:
        s = self.settings
        db_url, blobs_url = database_url(s.database_url, s.data_dir), blob_url(s.blob_url, s.data_dir)
        self._database_scheme = db_url.scheme
        s.data_dir.mkdir(parents=True, exist_ok=True)
        # Two servers on one data directory would each drive the same batches.
        self._data_lock = DataDirLock(s.data_dir)
        try:
            self._data_lock.acquire()
        except DataDirInUse as err:
            self._data_lock = None
            raise StartupError(str(err)) from None
        # The one place that picks the storage implementations (store/urls.py).
        self._database = await open_database(db_url, s.data_dir)
        self.store = self._database.metadata
        if not s.shared:  # the database is in the data directory locked above: no other server writes it
            self.store.assume_sole_writer()
        self._blobs = blobs = await open_blob_store(blobs_url, s.data_dir)
        self.auth = Authenticator(self.store, s.master_key)
        await self.auth.start()
        self.page_tokens = PageTokens(await self.store.server_secret(PAGE_TOKEN_SECRET))
        self._validation_workers = ValidationWorkers(s.upload_workers) if s.upload_workers > 0 else None
        self.files = FileManager(self.store, blobs, FileLimits(
            s.max_file_bytes, s.max_file_lines, s.max_chunk_bytes, upload_idle_timeout=s.upload_idle_timeout,
            max_uploads_per_project=s.max_uploads_per_project), self.page_tokens, self._validation_workers)
        orphans = 0 if s.shared else await self.files.remove_orphan_blobs()
        if orphans:
            log.info("removed %d blob(s) with no file record", orphans)
        if s.metrics_address:
            from batchgate_server.observability.metrics import Metrics
            self.metrics = Metrics()
        self._build_batch_layer(blobs)
        logs.add_secrets([s.master_key, *(str(v) for d in self.model_list.deployments
                                          for k, v in d.params.items() if is_secret_param(str(k)) and v)])
        server = grpc.aio.server(options=grpc_options(s))
        # Undecodable requests are INVALID_ARGUMENT, not UNKNOWN; calls wait for start-up; calls
        # are timed when metrics are on. All wrapped once here: no per-call interceptor.
        wrappers = (self.ready.wrap,) + ((self.metrics.grpc_wrapper(),) if self.metrics is not None else ()) \
            + ((tracing.rpc_wrapper,) if tracing.active() else ())
        ours = SoftDecoding(server, wrappers)
        file_pb2_grpc.add_FileServiceServicer_to_server(FileServicer(self.auth, self.files), ours)
        self._add_batch_service(ours)
        usage_pb2_grpc.add_UsageServiceServicer_to_server(
            UsageServicer(self.auth, UsageReporter(self._database.ledger, self.page_tokens)), ours)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminServicer(self.auth, Admin(self.store, self.quotas, self.files, self.page_tokens)), ours)
        webhook_pb2_grpc.add_WebhookServiceServicer_to_server(WebhookServicer(self.auth, self.webhooks), ours)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        enable_reflection((*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)

        address, http_address = s.address, s.http_address
        if self.auth.open:
            address = loopback_only(address)
            http_address = http_address and loopback_only(http_address)
            log.warning("no API key configured (BATCHGATE_MASTER_KEY or `batchgate-server keys create`):"
                        " serving without authentication, on loopback only (%s)", address)
        credentials = server_credentials(s)
        try:
            if credentials is None:
                self.port = server.add_insecure_port(address)
            else:
                self.port = server.add_secure_port(address, credentials)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            reason = bind_error(address)
            if credentials is not None and reason == BIND_ERROR_UNKNOWN:  # the port is free: TLS was refused
                raise ConfigError("gRPC refused the TLS credentials: --tls-cert and --tls-key must be PEM, and the"
                                  " key must belong to the certificate")
            raise StartupError(f"cannot listen on {address}: {reason}")
        if self.metrics is not None:
            self.metrics.watch(self.tracker, self.router, [d.id for d in self.model_list.deployments])
            from batchgate_server.observability.metrics import MetricsServer
            self._metrics_server = MetricsServer(self.metrics)
            self.metrics_port = await self._metrics_server.start(s.metrics_address)
            log.info("Prometheus metrics on http://%s/metrics (port %d)", s.metrics_address, self.metrics_port)
        # Health says NOT_SERVING, and every other call waits (api/readiness.py), until unfinished
        # batches are adopted.
        for name in (*SERVICE_NAMES, ""):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._health = health_servicer
        await server.start()
        self._server = server
        await self._start_background()
        self.ready.open()
        self.deployment_health = DeploymentHealth(self.model_list.deployments, self.providers,
                                                  interval=s.deployment_health_interval,
                                                  on_change=self._deployment_health_changed)
        self.deployment_health.start()
        if http_address:
            http_app = build_app(self.auth, self.files, self.batches, s.heartbeat_interval)
            if self.metrics is not None:
                http_app.middlewares.insert(0, self.metrics.http_middleware())
            self._http = HttpServer(http_app, s.grace_period)
            self.http_port = await self._http.start(http_address)
            log.info("OpenAI-compatible HTTP API on %s (port %d)", http_address, self.http_port)
        for name in (*SERVICE_NAMES, ""):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._tasks.append(asyncio.create_task(self.files.run_expiry_sweeps(s.expiry_sweep_interval)))
        self._tasks.append(asyncio.create_task(self.webhooks.run(), name="webhook-deliverer"))
        log.info("batchgate listening on %s (port %d, %s), data in %s (metadata %s, blobs %s)", address,
                 self.port, "plaintext" if credentials is None else "mutual TLS" if s.tls_client_ca else "TLS",
                 s.data_dir, db_url, blobs_url)
        return self.port

    async def _deployment_health_changed(self, deployment, ok: bool) -> None:
        await self._health.set(DEPLOYMENT_HEALTH_PREFIX + deployment.id, health_pb2.HealthCheckResponse.SERVING
                               if ok else health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.metrics is not None:
            self.metrics.deployment_up.labels(deployment.id, deployment.provider).set(1 if ok else 0)

    def _batch_events(self) -> BatchEvents:
        observers: list[BatchEvents] = [o for o in (self.metrics,) if o is not None]
        if tracing.active():
            observers.append(tracing.BatchTraces())
        if len(observers) <= 1:
            return observers[0] if observers else BatchEvents()
        return EventFanout(observers)

    def _build_batch_layer(self, blobs: BlobStore) -> None:
        s = self.settings
        self.model_list = load_model_list(s.config_file)
        prices = PriceTable.load_builtin()
        if s.price_file is not None:
            prices = PriceTable.load_file(s.price_file, base=prices)
        self.accounting = Accounting(prices)
        self.router = Router(self.model_list)
        self.providers = ProviderRegistry(request_events=self.metrics.requests if self.metrics else None)
        self.hub = WatchHub(self.store, poll_interval=self._watch_poll_interval())
        self.ownership = Ownership(self.store, replica_id(s.data_dir), s.lease_timeout)
        self.webhooks = Webhooks(self.store, self.model_list.webhooks, retry_schedule=s.webhook_retry_schedule,
                                 timeout=s.webhook_timeout)
        self.tracker = Tracker(self.store, blobs, self.hub, self.router, self.providers, self.accounting,
                               s.work_dir, self.ownership, shared_progress=s.shared, events=self._batch_events(),
                               webhooks=self.webhooks)
        self.files.used_by = self.tracker.batch_reading
        self.quotas = Quotas(self.store, self._database.ledger, self.model_list.quotas)
        self.files.quotas = self.quotas
        self.batches = BatchManager(self.store, self.files, self.router, self.providers, self.tracker, self.hub,
                                    self.accounting, self.page_tokens, self.quotas)
        log.info("model list from %s: %s", self.model_list.source,
                 ", ".join(f"{d.model_name} ({d.provider}/{d.model}, id {d.id})" for d in self.model_list.deployments))

    def _watch_poll_interval(self) -> float:
        """How often watched batches driven elsewhere are read: never for a server alone on its
        database; often on shared SQLite, whose change feed does not cross processes; seldom,
        as a safety net under the change feed, on a database that notifies (PostgreSQL)."""
        if not self.settings.shared:
            return 0.0
        return WATCH_POLL_WITHOUT_FEED if self._database_scheme == "sqlite" else WATCH_POLL_UNDER_FEED

    def _add_batch_service(self, server: SoftDecoding) -> None:
        add_batch_service(BatchServicer(self.auth, self.batches, self.settings.heartbeat_interval), server)

    async def _start_background(self) -> None:
        # Build the configured providers now: importing their HTTP stacks on the first
        # CreateBatch would stall that call (and every other) for a good half second.
        for provider in sorted({d.provider for d in self.model_list.deployments}):
            try:
                self.providers.get(provider)
            except UnsupportedRequest as err:
                log.warning("provider %s unavailable: %s", provider, err.message)
        await self.tracker.start()
        self.hub.start()

    async def stop(self, grace: float | None = None) -> None:
        if self._http is not None:
            await self._http.stop()
        if self._metrics_server is not None:
            await self._metrics_server.stop()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._health.enter_graceful_shutdown()
            await self._server.stop(self.settings.grace_period if grace is None else grace)
        if hasattr(self, "deployment_health"):
            await self.deployment_health.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._stop_background()
        if self._validation_workers is not None:
            await self._validation_workers.close()
        if self._blobs is not None:
            await self._blobs.close()
        if self._database is not None:
            await self._database.close()
        if self._data_lock is not None:
            self._data_lock.release()

    async def _stop_background(self) -> None:
        if hasattr(self, "tracker"):
            await self.hub.stop()
            await self.tracker.stop()
            await self.providers.close()
            await self.ownership.stop()  # hands this replica's batches to the others at once

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()
