"""Exec node: env resolution and $(VAR) expansion, as the kubelet defines them."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from temper_dev.execnode import PodSpecError, expand_vars, resolve_env

pytestmark = pytest.mark.unit

POD = {
    "metadata": {
        "name": "trainer-0",
        "namespace": "team-a",
        "uid": "uid-123",
        "labels": {"app": "temper", "stage": "sft"},
        "annotations": {"temper.dev/run": "r1"},
    },
    "spec": {"nodeName": "exec-node"},
}
OBJECTS: dict[tuple[str, str], dict[str, str]] = {
    ("Secret", "creds"): {"AWS_SECRET_ACCESS_KEY": "s3cr3t"},
    ("ConfigMap", "settings"): {"mode": "fast", "steps": "5"},
}


def lookup(kind: str, name: str) -> Mapping[str, str] | None:
    return OBJECTS.get((kind, name))


def test_values_field_refs_and_key_refs_resolve() -> None:
    container = {
        "env": [
            {"name": "A", "value": "plain"},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {
                "name": "STAGE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['stage']"}},
            },
            {
                "name": "RUN",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['temper.dev/run']"}},
            },
            {
                "name": "KEY",
                "valueFrom": {"secretKeyRef": {"name": "creds", "key": "AWS_SECRET_ACCESS_KEY"}},
            },
            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
        ]
    }
    env = resolve_env(container, POD, lookup)
    assert env == {
        "A": "plain",
        "POD": "trainer-0",
        "NS": "team-a",
        "UID": "uid-123",
        "NODE": "exec-node",
        "IP": "127.0.0.1",
        "STAGE": "sft",
        "RUN": "r1",
        "KEY": "s3cr3t",
        "MODE": "fast",
    }


def test_all_labels_render_like_downward_api() -> None:
    container = {"env": [{"name": "L", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels"}}}]}
    assert resolve_env(container, POD, lookup)["L"] == 'app="temper"\nstage="sft"'


def test_env_from_with_prefix_and_later_env_wins() -> None:
    container = {
        "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "CFG_"}],
        "env": [{"name": "CFG_mode", "value": "slow"}],
    }
    assert resolve_env(container, POD, lookup) == {"CFG_mode": "slow", "CFG_steps": "5"}


def test_missing_secret_names_the_variable() -> None:
    container = {"env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k"}}}]}
    with pytest.raises(PodSpecError, match=r"env TOKEN\.valueFrom\.secretKeyRef: Secret 'nope'"):
        resolve_env(container, POD, lookup)


def test_missing_key_names_the_key_and_optional_is_skipped() -> None:
    ref = {"name": "settings", "key": "absent"}
    with pytest.raises(PodSpecError, match="key 'absent' not found"):
        resolve_env({"env": [{"name": "X", "valueFrom": {"configMapKeyRef": ref}}]}, POD, lookup)
    optional = {"env": [{"name": "X", "valueFrom": {"configMapKeyRef": {**ref, "optional": True}}}]}
    assert resolve_env(optional, POD, lookup) == {}


def test_unsupported_field_path_is_rejected() -> None:
    container = {"env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "status.phase"}}}]}
    with pytest.raises(PodSpecError, match=r"status\.phase"):
        resolve_env(container, POD, lookup)


def test_var_expansion_follows_kubernetes_rules() -> None:
    env = {"A": "x", "B": "y"}
    assert expand_vars("$(A)-$(B)", env) == "x-y"
    assert expand_vars("$$(A)", env) == "$(A)"  # escaped
    assert expand_vars("$(UNKNOWN)", env) == "$(UNKNOWN)"  # left as written
    container = {"env": [{"name": "A", "value": "a"}, {"name": "AB", "value": "$(A)b"}]}
    assert resolve_env(container, POD, lookup)["AB"] == "ab"
