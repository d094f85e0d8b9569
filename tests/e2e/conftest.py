"""e2e fixtures: a hermetic cluster whose exec node runs every pod as a container from its image,
and the operator as users run it, installed by Helm from the locally built operator image.

Images come from ``make images`` (``hack/build-images.sh``); the fixture calls it too, which is a
content-hash check when they are current, so running pytest directly never tests stale images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from temper_dev.cluster import Cluster
from temper_dev.incluster import HelmOperator, build_images
from temper_dev.s3server import S3Server

from tests.fixtures.operator import install_crds
from tests.fixtures.prometheus import Monitoring

# The intervals of tests/fixtures/operator.py, so in-cluster tests are as quick.
FAST_ENV = {
    "TEMPER_LEASE_RENEW_SECONDS": "1",
    "TEMPER_PROGRESS_INTERVAL_SECONDS": "0.5",
    "TEMPER_TRAINER_PROGRESS_INTERVAL_SECONDS": "1",
}


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    state_dir: Path = tmp_path_factory.mktemp("hermetic-cluster-oci")
    build_images(state_dir / "build-images.log")
    hermetic = Cluster(state_dir=state_dir, runtime="container")
    hermetic.up(timeout=120)
    try:
        yield hermetic
    finally:
        hermetic.down()


@pytest.fixture(scope="session")
def temper_crds(cluster: Cluster) -> None:
    """The CRDs in this directory's cluster. The root fixture of the same name is session-scoped
    too, and after the cluster tests it would still answer for the process-mode cluster."""
    install_crds(cluster)


@pytest.fixture
def helm_operator(
    request: pytest.FixtureRequest,
    cluster: Cluster,
    temper_crds: None,
    namespace: str,
    s3_server: S3Server,
) -> Iterator[HelmOperator]:
    """``helm install charts/temper`` into the test's namespace (restricted Pod Security),
    watching it; the operator pod runs on the exec node from the operator image.

    Under ``helm_monitoring`` Prometheus scrapes the trainer pods, so they wait for a final scrape
    (``trainer.metricsFinalScrapeSeconds``, as a user with a Prometheus of their own sets it): 15 s
    covers Prometheus's 5 s target-update batching plus the 1 s interval.
    """
    watched = "helm_monitoring" in request.fixturenames
    operator = HelmOperator(
        Path(cluster.kubeconfig),
        namespace,
        cluster.state_dir,
        helm=cluster.bin("helm"),
        storage_endpoint=s3_server.endpoint_url,
        extra_env=FAST_ENV,
        lease_seconds=5,
        extra_values={"trainer": {"metricsFinalScrapeSeconds": 15}} if watched else {},
    )
    operator.install(timeout=180)
    try:
        yield operator
    finally:
        operator.uninstall()


@pytest.fixture
def helm_monitoring(monitor_factory: Callable[..., Monitoring], helm_operator: HelmOperator) -> Monitoring:
    """A real Prometheus scraping the Helm-installed operator's pod (ServiceMonitor) and the
    trainer pods (PodMonitor). Stuck window 5m: a loaded 2-core machine may sit minutes in one
    eval pass, whose progress moves only at its end (the chart's default is 30m)."""
    pod = helm_operator.pod()
    assert pod is not None, helm_operator.describe()
    return monitor_factory(helm_operator, stage_stuck_for="5m", pod=pod.metadata.name)
