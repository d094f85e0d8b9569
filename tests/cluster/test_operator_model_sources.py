"""Models and data from where users keep them, through the operator on the exec node.

Two runs at once, each one SFT stage of the real trainer:

- ``pvc://models/tiny``: a PersistentVolumeClaim bound to a local (hostPath) PersistentVolume
  holding the model; the Job mounts the claim read-only and the exec node maps it to the PV's
  folder, as a kubelet would.
- ``hf://zoo/tiny-qwen2`` with an ``hf://datasets/...`` training set, served by olah (a real
  Hub-compatible mirror on loopback): the operator passes its HF_ENDPOINT and the token Secret
  by secretKeyRef; the Adapter's lineage records the commit main was pinned to.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from temper_dev.cluster import Cluster
from temper_dev.hub import OlahHub

from tests.cluster.test_operator_pipeline import Api, pipeline, wait_for
from tests.fixtures.hub import HubModel

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

EXEC = {
    "nodeSelector": {"kubernetes.io/hostname": "exec-node"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}
HF_TOKEN = "hf_not-a-real-token-0123456789"


@pytest.fixture
def api(cluster: Cluster, namespace: str) -> Api:
    return Api(cluster, namespace)


@pytest.fixture
def pv_names(cluster: Cluster) -> Any:
    """PersistentVolumes are cluster-scoped: delete the test's own when it ends."""
    names: list[str] = []
    yield names
    with cluster.api_client() as api_client:
        for name in names:
            client.CoreV1Api(api_client).delete_persistent_volume(name)


def _local_claim(cluster: Cluster, namespace: str, claim: str, folder: Path) -> str:
    """A hostPath PersistentVolume pre-bound to ``claim``, as a static local provisioner makes."""
    pv_name = f"{namespace}-{claim}"
    with cluster.api_client() as api_client:
        core = client.CoreV1Api(api_client)
        core.create_persistent_volume(
            {
                "metadata": {"name": pv_name},
                "spec": {
                    "capacity": {"storage": "1Gi"},
                    "accessModes": ["ReadOnlyMany"],
                    "storageClassName": "",
                    "persistentVolumeReclaimPolicy": "Retain",
                    "hostPath": {"path": str(folder), "type": "Directory"},
                    "claimRef": {"namespace": namespace, "name": claim},
                },
            }
        )
        core.create_namespaced_persistent_volume_claim(
            namespace,
            {
                "metadata": {"name": claim},
                "spec": {
                    "accessModes": ["ReadOnlyMany"],
                    "storageClassName": "",
                    "volumeName": pv_name,
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            },
        )

        def bound() -> bool:
            pvc = core.read_namespaced_persistent_volume_claim(claim, namespace)
            return pvc.status is not None and pvc.status.phase == "Bound"

        wait_for(f"claim {claim} to bind", bound, 60)
    return pv_name


def _secret(cluster: Cluster, namespace: str, name: str, data: dict[str, str]) -> None:
    with cluster.api_client() as api_client:
        client.CoreV1Api(api_client).create_namespaced_secret(
            namespace, {"metadata": {"name": name}, "stringData": data}
        )


def _run(name: str, bucket: str, s3_endpoint: str, base: dict[str, Any], train: str, **spec: Any) -> Any:
    stage = {
        "name": "sft",
        "type": "sft",
        "data": {"train": [train]},
        "hyperparameters": {"maxSteps": 2, "batchSize": 4, "maxLength": 48},
        "resources": EXEC,
    }
    body = pipeline(name, bucket, stages=[stage], **spec)
    body["spec"]["baseModel"] = base
    body["spec"]["storage"]["endpointUrl"] = s3_endpoint
    return body


def test_stages_train_from_a_pvc_and_from_the_hub(
    api: Api,
    cluster: Cluster,
    namespace: str,
    operator_factory: Any,
    s3_server: Any,
    s3_bucket: str,
    s3_secret: str,
    tiny_model: Path,
    olah_hub: OlahHub,
    arch_models: dict[str, HubModel],
    tmp_path: Path,
    pv_names: list[str],
) -> None:
    operator = operator_factory(TEMPER_HF_ENDPOINT=olah_hub.endpoint)
    operator.wait_role("leader")
    volume = tmp_path / "pv"
    shutil.copytree(tiny_model, volume / "tiny")
    pv_names.append(_local_claim(cluster, namespace, "models", volume))
    _secret(cluster, namespace, "hf-token", {"HF_TOKEN": HF_TOKEN})
    data = tmp_path / "chat-data"
    data.mkdir()
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(4) for b in range(4)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data_sha = olah_hub.add_repo("acme/sums", data, repo_type="dataset")
    qwen = arch_models["qwen2"]

    from_pvc = _run("from-pvc", s3_bucket, s3_server.endpoint_url, {"uri": "pvc://models/tiny"}, "tickets")
    from_hub = _run(
        "from-hub",
        s3_bucket,
        s3_server.endpoint_url,
        {"uri": qwen.uri, "secretRef": {"name": "hf-token"}},
        "sums",
    )
    from_hub["spec"]["datasets"].append({"name": "sums", "uri": "hf://datasets/acme/sums"})
    api.create_run(from_pvc)
    api.create_run(from_hub)
    for name in ("from-pvc", "from-hub"):
        wait_for(f"{name} finished", lambda n=name: api.succeeded(n) or api.failed(n), 300, operator)
    for name in ("from-pvc", "from-hub"):
        logs = [cluster.pod_log(api.ns, p.metadata.name)[-3000:] for p in api.pods(name)]
        assert api.succeeded(name), (api.run(name)["status"], logs)

    pod = api.pods("from-pvc")[0].to_dict()["spec"]
    claim = next(v for v in pod["volumes"] if v["name"] == "base-model")["persistent_volume_claim"]
    assert claim == {"claim_name": "models", "read_only": True}
    hub_pod = api.pods("from-hub")[0].to_dict()["spec"]["containers"][0]
    token = next(e for e in hub_pod["env"] if e["name"] == "HF_TOKEN")
    assert token["value"] is None
    assert token["value_from"]["secret_key_ref"]["name"] == "hf-token"

    adapters = {a["metadata"]["name"]: a for a in api.adapters()}
    assert adapters["from-pvc-sft-g1"]["status"]["lineage"]["baseModel"] == "pvc://models/tiny"
    lineage = adapters["from-hub-sft-g1"]["status"]["lineage"]
    assert lineage["baseModel"] == qwen.uri
    assert lineage["baseModelRevision"] == qwen.sha  # main, pinned to its commit
    sums = next(d for d in lineage["datasets"] if d["uri"] == "hf://datasets/acme/sums")
    assert (sums["name"], sums["version"]) == ("sums", data_sha)
    everything = json.dumps([api.run("from-hub"), adapters]) + "".join(
        str(e.message) for e in api.events("from-hub")
    )
    assert HF_TOKEN not in everything
