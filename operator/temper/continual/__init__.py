"""Continual learning and the adapter catalog's lifecycle: pure planning, no Kubernetes calls.

Each module is a pure function of its inputs (spec, status, observed objects, a clock) so the
kopf handlers in ``temper.handlers.continual`` / ``temper.handlers.adapter_lifecycle`` stay thin.
"""
