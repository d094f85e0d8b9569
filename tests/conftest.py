# Fixtures live in one module per concern so parallel work on them never collides.
pytest_plugins = [
    "tests.fixtures.cluster",
    "tests.fixtures.s3",
    "tests.fixtures.models",
    "tests.fixtures.operator",
]
