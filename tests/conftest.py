import os

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
