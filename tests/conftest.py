import os
from typing import Any

import pytest

# Tiny-model matmuls gain nothing from intra-op threads, and on 2 shared cores the thread
# pool's spinning costs far more than it saves. Set before torch is first imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

# Fixtures live in one module per concern so parallel work on them never collides.
pytest_plugins = [
    "tests.fixtures.cluster",
    "tests.fixtures.s3",
    "tests.fixtures.models",
    "tests.fixtures.operator",
    "tests.fixtures.kueue",
    "tests.fixtures.prometheus",
    "tests.fixtures.hub",
]


def pytest_configure(config: pytest.Config) -> None:
    # Here, not in pyproject.toml: the images' dependency layer is keyed by that file.
    config.addinivalue_line(
        "markers",
        "examples: every example through the Helm-installed operator (make examples, ~6 min alone);"
        " left out of make test, which would take ~20 min warm with it on 2 cores",
    )


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under ``pytest -n 2`` (``make test``) each hermetic cluster's tests stay on one worker, so
    each cluster starts once: tests/cluster (process pods) on one, tests/e2e (container pods) on
    the other; the unit tests, one scope each, fill both. (pytest 9 ignores ``xdist_group``.)"""
    from xdist.scheduler import LoadScopeScheduling

    class SuiteScheduling(LoadScopeScheduling):  # type: ignore[misc]  # xdist is untyped here
        def _split_scope(self, nodeid: str) -> str:
            parts = nodeid.split("/")
            return parts[1] if len(parts) > 2 and parts[1] in ("cluster", "e2e") else nodeid

    return SuiteScheduling(config, log)
