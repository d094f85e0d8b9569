"""Continual learning and the adapter catalog's lifecycle: pure planning, no Kubernetes calls.

Each module is a pure function of its inputs (spec, status, observed objects, a clock); the I/O
is in ``temper.handlers.continual_apply`` (and ``temper.handlers.adapter_lifecycle``), so the kopf
handlers in ``temper.handlers`` stay a few lines each.
"""
