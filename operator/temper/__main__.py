"""``python -m temper`` / ``temper-operator``: health and metrics first, then the Lease, then kopf.

Start-up order matters: probes answer at once (a standby is alive and ready to take over), the
caches are primed with one LIST per resource before the first reconcile (so a restarted leader
never plans from a half-seen world), and only then do kopf's watches and the workers start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading

# kopf imports the generated ``kubernetes`` client, when installed, only to recognise its model
# objects; the operator never uses it (temper.kube speaks JSON), and it would cost 50 MB of RSS.
sys.modules.setdefault("kubernetes", None)  # type: ignore[arg-type]

import kopf  # noqa: E402
from aiohttp import web  # noqa: E402
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest  # noqa: E402

from temper import handlers  # noqa: E402
from temper.builders.names import LABEL_COMPONENT, LABEL_RUN  # noqa: E402
from temper.config import ConfigError, OperatorConfig  # noqa: E402
from temper.continual.promotion import ALIAS_LABEL  # noqa: E402
from temper.handlers.continual_apply import is_continual  # noqa: E402
from temper.handlers.runtime import Runtime  # noqa: E402
from temper.kube import ADAPTER_PLURAL, RUN_PLURAL, Kube, list_objects  # noqa: E402
from temper.leader import LeaderElector  # noqa: E402

log = logging.getLogger("temper")
# Shutdown never waits longer than this: S3 or API calls stuck in worker threads (a partitioned
# endpoint) would otherwise hold the exit, e.g. in asyncio.run's default-executor shutdown.
SHUTDOWN_GRACE_SECONDS = 3.0


class Health:
    def __init__(self) -> None:
        self.alive = True
        self.role = "starting"  # starting -> standby -> leader

    async def healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok" if self.alive else "dead", status=200 if self.alive else 500)

    async def readyz(self, _: web.Request) -> web.Response:
        # Ready means "able to serve its role": a standby is ready to take over.
        ready = self.role in ("standby", "leader")
        return web.Response(text=self.role, status=200 if ready else 503)


async def metrics_handler(_: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def serve(config: OperatorConfig, health: Health) -> list[web.AppRunner]:
    runners = []
    health_app = web.Application()
    health_app.add_routes([web.get("/healthz", health.healthz), web.get("/readyz", health.readyz)])
    metrics_app = web.Application()
    metrics_app.add_routes([web.get("/metrics", metrics_handler)])
    apps = [(health_app, config.health_port), (metrics_app, config.metrics_port)]
    if config.health_port == config.metrics_port:
        health_app.add_routes([web.get("/metrics", metrics_handler)])
        apps = [(health_app, config.health_port)]
    for app, port in apps:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, config.bind_address, port).start()
        runners.append(runner)
    return runners


async def prime(runtime: Runtime, namespaces: tuple[str, ...]) -> None:
    kube = runtime.kube
    selector = f"{LABEL_RUN},{LABEL_COMPONENT}=trainer"
    for job in await list_objects(kube, "jobs", namespaces, LABEL_RUN):
        runtime.caches.put_job(job)
    for pod in await list_objects(kube, "pods", namespaces, selector):
        runtime.caches.put_pod(pod)
    for svc in await list_objects(kube, "services", namespaces, selector):
        runtime.caches.put_service(svc)
    for adapter in await list_objects(kube, ADAPTER_PLURAL, namespaces):
        runtime.caches.put_adapter(adapter)
        runtime.enqueue("adapter", (adapter["metadata"]["namespace"], adapter["metadata"]["name"]))
    for cm in await list_objects(kube, "configmaps", namespaces, ALIAS_LABEL):
        runtime.caches.put_alias(cm)
    for run in await list_objects(kube, RUN_PLURAL, namespaces):
        runtime.caches.put_run(run)
        key = (run["metadata"]["namespace"], run["metadata"]["name"])
        runtime.enqueue("continual" if is_continual(run.get("spec") or {}) else "run", key)


def kopf_settings() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True  # CRDs exist before the operator starts: no CRD/namespace watch
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    # Events only feed caches and a de-duplicating queue: no need for kopf's 100 ms debounce.
    settings.batching.batch_window = 0.01
    return settings


async def run_operator(config: OperatorConfig) -> None:
    health = Health()
    runners = await serve(config, health)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    kube = Kube(workers=config.workers + 4)
    elector = LeaderElector(kube, config)

    async def shutdown() -> None:
        # Every action is idempotent and re-derived from the cluster on start-up, so there is no
        # in-flight work worth draining: hand the Lease over and exit at once.
        log.info("shutting down: releasing the lease")
        hard_exit_after(SHUTDOWN_GRACE_SECONDS)
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(elector.release(), timeout=2)
        logging.shutdown()
        os._exit(0)

    def install_signals() -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(shutdown()))

    install_signals()
    runtime = Runtime(kube, config)
    try:
        if config.leader_election:
            health.role = "standby"
            acquire = asyncio.create_task(elector.acquire())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({acquire, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                acquire.cancel()
                return
            stopped.cancel()
            kube.fence = elector.may_act
            elector.keep_in_thread()
        await prime(runtime, config.namespaces)
        handlers.install(runtime)
        runtime.start()
        health.role = "leader"
        log.info(
            "leading as %s; watching %s", config.identity, ",".join(config.namespaces) or "all namespaces"
        )
        kopf_task = asyncio.create_task(
            kopf.operator(
                standalone=True,
                clusterwide=not config.namespaces,
                namespaces=list(config.namespaces),
                settings=kopf_settings(),
                stop_flag=stop,
            )
        )
        await asyncio.sleep(0.5)
        install_signals()  # kopf installs its own (slow, draining) handlers at start-up: ours win
        await kopf_task
    finally:
        hard_exit_after(SHUTDOWN_GRACE_SECONDS)  # asyncio.run joins executor threads next
        await runtime.stop()
        await elector.release()
        for runner in runners:
            await runner.cleanup()
        await kube.close()


def hard_exit_after(seconds: float) -> None:
    """Exit the process after ``seconds`` even if the event loop or its threads are stuck."""

    def _exit() -> None:
        logging.shutdown()
        os._exit(0)

    timer = threading.Timer(seconds, _exit)
    timer.daemon = True
    timer.start()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("kopf", "aiohttp.access", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        config = OperatorConfig.from_env()
    except ConfigError as exc:
        print(f"temper-operator: invalid configuration: {exc}", file=sys.stderr)
        sys.exit(2)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_operator(config))
    # Interpreter exit would join worker threads, including any stuck on a partitioned endpoint.
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
