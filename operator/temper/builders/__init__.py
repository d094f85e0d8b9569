"""Pure manifest builders: no I/O, the same inputs always give the same objects."""

from __future__ import annotations

from temper.builders.adapter import build_adapter
from temper.builders.contract import UnresolvedReference, spec_hash, stage_contract, storage_config
from temper.builders.job import build_job, build_service, owner_reference, stage_labels
from temper.builders.network import trainer_network_policy

__all__ = [
    "UnresolvedReference",
    "build_adapter",
    "build_job",
    "build_service",
    "owner_reference",
    "spec_hash",
    "stage_contract",
    "stage_labels",
    "storage_config",
    "trainer_network_policy",
]
