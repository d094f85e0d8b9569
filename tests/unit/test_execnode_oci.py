"""The exec node's container mode, pure part: pod spec -> ``podman create`` arguments."""

from __future__ import annotations

from typing import Any

import pytest
from temper_dev.oci import ContainerConfigError, ImageInfo, Mount, create_argv, host_entries, parse_quantity

from tests.unit.test_chart_dockerfile import trainer_job

pytestmark = pytest.mark.unit

IMAGE = ImageInfo(id="sha256:abc", user="65532:0", entrypoint=["python", "-m", "temper_trainer"], cmd=["run"])
ROOT_IMAGE = ImageInfo(id="sha256:def", user="", entrypoint=["sh"], cmd=[])


def pod(spec: dict[str, Any] | None = None, **container: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u"},
        "spec": {"containers": [{"name": "main", "image": "x", **container}], **(spec or {})},
    }


def argv_for(p: dict[str, Any], image: ImageInfo = IMAGE, **kw: Any) -> list[str]:
    args: dict[str, Any] = {"env_names": [], "mounts": [], "hosts": [], "labels": {}}
    args.update(kw)
    return create_argv(name="c", pod=p, container=p["spec"]["containers"][0], image=image, **args)


def test_the_trainer_job_runs_restricted_in_its_image() -> None:
    spec = trainer_job()["spec"]["template"]["spec"]
    p = {"metadata": {"name": "p", "namespace": "ns", "uid": "u"}, "spec": spec}
    argv = argv_for(p, env_names=["TEMPER_STAGE_CONTRACT", "AWS_SECRET_ACCESS_KEY"])
    assert "--read-only" in argv
    assert "--read-only-tmpfs=false" in argv, "podman's own tmpfs would hide missing volumes"
    assert "--cap-drop=ALL" in argv
    assert argv[argv.index("--security-opt") + 1] == "no-new-privileges"
    assert not [a for a in argv if a.startswith("--user")], "the image's USER decides"
    assert "--entrypoint=" + '["python", "-m", "temper_trainer", "run"]' in argv
    assert argv[argv.index("-e") + 1] == "TEMPER_STAGE_CONTRACT"
    assert not [a for a in argv if "=" in a and a.startswith("AWS_")], "env values never on argv"
    assert argv[-1] == IMAGE.id


def test_run_as_non_root_refuses_a_root_image_like_the_kubelet() -> None:
    restricted = {"securityContext": {"runAsNonRoot": True}}
    with pytest.raises(ContainerConfigError, match="image will run as root"):
        argv_for(pod(restricted), ROOT_IMAGE)
    named = ImageInfo(id="i", user="temper", entrypoint=["x"], cmd=[])
    with pytest.raises(ContainerConfigError, match="non-numeric user"):
        argv_for(pod(restricted), named)
    with pytest.raises(ContainerConfigError, match="breaks non-root"):
        argv_for(pod(restricted, securityContext={"runAsUser": 0}), IMAGE)
    # An explicit non-root UID makes any image acceptable, and wins over the image's USER.
    argv = argv_for(pod({"securityContext": {"runAsNonRoot": True, "runAsUser": 1000}}), ROOT_IMAGE)
    assert "--user=1000" in argv
    argv = argv_for(pod({"securityContext": {"runAsUser": 5, "runAsGroup": 6, "fsGroup": 7}}))
    assert "--user=5:6" in argv
    assert "--group-add=7" in argv


def test_command_args_workdir_and_the_image_defaults() -> None:
    argv = argv_for(pod(args=["--help"]))
    assert argv[-2:] == [IMAGE.id, "--help"], "args replace the image's CMD, keep its ENTRYPOINT"
    assert argv_for(pod())[-2:] == [IMAGE.id, "run"]
    argv = argv_for(pod(command=["sh", "-c"], args=["echo hi"], workingDir="/w"))
    assert '--entrypoint=["sh", "-c"]' in argv
    assert "--workdir=/w" in argv
    assert argv[-1] == "echo hi"
    with pytest.raises(ContainerConfigError, match="no command"):
        argv_for(pod(), ImageInfo(id="i", user="1", entrypoint=[], cmd=[]))


def test_mounts_memory_limit_grace_and_privileged() -> None:
    mounts = [Mount("/dev/shm", tmpfs_bytes=2**30), Mount("/data", "/host/data", read_only=True)]
    argv = argv_for(
        pod({"terminationGracePeriodSeconds": 7}, resources={"limits": {"memory": "512Mi"}}), mounts=mounts
    )
    assert "type=tmpfs,destination=/dev/shm,tmpfs-mode=1777,tmpfs-size=1073741824" in argv
    assert "type=bind,source=/host/data,destination=/data,ro" in argv
    assert f"--memory={512 * 2**20}" in argv
    assert "--stop-timeout=7" in argv
    with pytest.raises(ContainerConfigError, match="privileged"):
        argv_for(pod(securityContext={"privileged": True}))


def test_host_aliases_and_pod_dns_names() -> None:
    p = pod(
        {
            "hostname": "job-0",
            "subdomain": "job-svc",
            "hostAliases": [{"ip": "10.1.2.3", "hostnames": ["a", "b"]}],
        }
    )
    hosts = host_entries(p, ["job-0", "job-1"])
    assert hosts[:2] == ["a:10.1.2.3", "b:10.1.2.3"]
    assert "job-0.job-svc:127.0.0.1" in hosts
    assert "job-1.job-svc.ns.svc.cluster.local:127.0.0.1" in hosts
    assert host_entries(pod(), ["x"]) == []


@pytest.mark.parametrize(
    ("text", "value"), [("1Gi", 2**30), ("512Mi", 512 * 2**20), ("1G", 10**9), ("100", 100), ("1e3", 1000)]
)
def test_quantities(text: str, value: int) -> None:
    assert parse_quantity(text) == value


def test_bad_quantity_names_the_value() -> None:
    with pytest.raises(ContainerConfigError, match="'12x'"):
        parse_quantity("12x")
