"""Exec node: mountPath rewriting, validation and the process environment."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from temper_dev.execnode import PodSpecError, container_env, rewrite_paths, validate_pod

pytestmark = pytest.mark.unit

MOUNTS = {"/data": "/s/vol/data", "/data/cache": "/s/vol/cache", "/out/": "/s/vol/out"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/data", "/s/vol/data"),
        ("/data/train.jsonl", "/s/vol/data/train.jsonl"),
        ("--input=/data/x", "--input=/s/vol/data/x"),
        ("/data/cache/hf", "/s/vol/cache/hf"),  # the longest mount wins
        ("/database", "/database"),  # not a path component match
        ("/mnt/data", "/mnt/data"),  # only as a prefix
        ("/out/model", "/s/vol/out/model"),
        ("a:/data:/out", "a:/s/vol/data:/s/vol/out"),
    ],
)
def test_rewrite_paths(text: str, expected: str) -> None:
    assert rewrite_paths(text, MOUNTS) == expected


def pod(volumes: list[dict[str, object]], **container: object) -> dict[str, object]:
    base = {"name": "main", "command": ["python"], **container}
    return {"spec": {"volumes": volumes, "containers": [base]}}


def test_supported_volumes_pass() -> None:
    volumes = [
        {"name": "a", "emptyDir": {}},
        {"name": "b", "configMap": {"name": "cm"}},
        {"name": "c", "secret": {"secretName": "s"}},
    ]
    validate_pod(pod(volumes, volumeMounts=[{"name": "a", "mountPath": "/a"}]))


def test_host_path_is_rejected_naming_the_field() -> None:
    with pytest.raises(PodSpecError, match=r"spec\.volumes\[0\] \(h\): volume type 'hostPath'"):
        validate_pod(pod([{"name": "h", "hostPath": {"path": "/"}}]))


def test_service_account_token_volume_explains_the_fix() -> None:
    volume = {"name": "kube-api-access-abcde", "projected": {"sources": []}}
    with pytest.raises(PodSpecError, match="automountServiceAccountToken: false"):
        validate_pod(pod([volume]))


def test_image_entrypoint_and_hooks_are_rejected() -> None:
    with pytest.raises(PodSpecError, match=r"spec\.containers\[0\] \(main\)\.command"):
        validate_pod({"spec": {"containers": [{"name": "main", "image": "x"}]}})
    with pytest.raises(PodSpecError, match="lifecycle"):
        validate_pod(pod([], lifecycle={"preStop": {"exec": {"command": ["x"]}}}))


def test_process_env_points_home_and_tmp_into_scratch(tmp_path: Path) -> None:
    env = container_env({"PATH": "/usr/bin", "LANG": "C.UTF-8"}, {"X": "1"}, tmp_path, tmp_path / "term")
    assert env["HOME"] == str(tmp_path / "home")
    assert env["TMPDIR"] == str(tmp_path / "tmp")
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert env["TEMPER_TERMINATION_LOG"] == str(tmp_path / "term")
    assert (env["X"], env["LANG"]) == ("1", "C.UTF-8")
