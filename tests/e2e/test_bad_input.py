"""A bad-input campaign against admission and the operator, on the real apiserver and exec node.

Every bad object must be refused by the apiserver with the offending field named, or become a run
whose conditions name the problem (Stalled/Failed with a reason), quickly; meanwhile the operator
stays healthy and a good run in the same namespace completes untouched.

Image faults run for real: the exec node runs trainer pods as containers from their images, so a
wrong image name, a root image under runAsNonRoot and an image without the trainer each get the
kubelet's own reasons (ErrImagePull, CreateContainerConfigError, the log tail on failure).

Unknown fields: the CRDs are structural and never preserve unknown fields in spec, so the apiserver
prunes them (default fieldValidation) or refuses them (fieldValidation=Strict, kubectl's default).
"""

from __future__ import annotations

import copy
import json
import random
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from temper_dev.cluster import Cluster
from temper_dev.demo import free_port
from temper_dev.incluster import IMAGE_TAG, OPERATOR_IMAGE, TRAINER_IMAGE
from temper_dev.s3server import FAKE_CREDENTIALS, S3Server

from tests.cluster.test_operator_pipeline import Api, wait_for
from tests.e2e.test_quickstart import quickstart_for
from tests.fixtures.operator import OperatorProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SEED = 8
MUTANTS = 16
ANNOTATION_LIMIT = 256 * 1024
REQUEST_LIMIT = 3 * 1024 * 1024  # the apiserver's cap on a request body; etcd's 1.5 MB is lower
BASE_IMAGE = "localhost/temper-base:bookworm-py311"  # hack/build-images.sh's Python base


def hyper(spec: dict[str, Any], stage: int) -> tuple[dict[str, Any], str]:
    return spec["stages"][stage]["hyperparameters"], f"spec.stages[{stage}].hyperparameters"


# Each mutation edits a copy of the quickstart spec and returns the path of the field it broke.
def wrong_type(spec: dict[str, Any], rng: random.Random) -> str:
    stage = rng.randrange(2)
    params, where = hyper(spec, stage)
    key = rng.choice(
        sorted(k for k, v in params.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    )
    params[key] = rng.choice(["lots", [1], {"n": 1}])
    return f"{where}.{key}"


def negative(spec: dict[str, Any], rng: random.Random) -> str:
    stage = rng.randrange(2)
    params, where = hyper(spec, stage)
    key = rng.choice(["maxSteps", "learningRate", "batchSize", "maxLength"])
    params[key] = -rng.randint(1, 1000)
    return f"{where}.{key}"


def bad_enum(spec: dict[str, Any], rng: random.Random) -> str:
    target = rng.choice(["stage", "format", "peft", "metric"])
    if target == "stage":
        spec["stages"][1]["type"] = "rlhf"
        return "spec.stages[1].type"
    if target == "format":
        spec["datasets"][0]["format"] = "yaml"
        return "spec.datasets[0].format"
    if target == "peft":
        spec["stages"][0]["peft"]["method"] = "lora2"
        return "spec.stages[0].peft.method"
    spec["stages"][2]["suites"][0]["metric"] = "vibes"
    return "spec.stages[2].suites[0].metric"


def missing_required(spec: dict[str, Any], rng: random.Random) -> str:
    target = rng.choice(["baseModel", "storage", "stages", "datasetUri", "stageName"])
    if target == "datasetUri":
        del spec["datasets"][1]["uri"]
        return "spec.datasets[1].uri"
    if target == "stageName":
        del spec["stages"][0]["name"]
        return "spec.stages[0].name"
    del spec[target]
    return f"spec.{target}"


MUTATIONS: list[Callable[[dict[str, Any], random.Random], str]] = [
    wrong_type,
    negative,
    bad_enum,
    missing_required,
]


def mutants(base: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """Deterministic (mutation, broken field, body) triples from the seeded RNG."""
    rng = random.Random(SEED)
    out = []
    for i in range(MUTANTS):
        body = copy.deepcopy(base)
        body["metadata"]["name"] = f"mutant-{i}"
        mutate = MUTATIONS[i % len(MUTATIONS)]  # every kind, then the RNG picks the field
        out.append((mutate.__name__, mutate(body["spec"], rng), body))
    return out


def rejection(api: Api, body: dict[str, Any], **kwargs: Any) -> ApiException | None:
    try:
        api.custom.create_namespaced_custom_object(
            "temper.dev", "v1alpha1", api.ns, "posttrainingruns", body, **kwargs
        )
    except ApiException as exc:
        return exc
    return None


def good_run(body: dict[str, Any], name: str) -> dict[str, Any]:
    """The quickstart cut to one short SFT stage: the cheapest run that trains and publishes."""
    run = copy.deepcopy(body)
    run["metadata"]["name"] = name
    sft = run["spec"]["stages"][0]
    sft["hyperparameters"] = {**sft["hyperparameters"], "maxSteps": 4}
    sft["data"] = {"train": ["arith"]}
    run["spec"]["stages"] = [sft]
    run["spec"]["storage"]["uri"] = run["spec"]["storage"]["uri"].rstrip("/") + f"-{name}/"
    return run


def healthz(operator: OperatorProcess) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.health_port}/healthz", timeout=2) as resp:
        return int(resp.status)


def finished(api: Api, name: str) -> Callable[[], bool]:
    return lambda: api.failed(name) or api.succeeded(name)


def conditions(api: Api, name: str) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (api.run(name).get("status") or {}).get("conditions") or []}


def test_admission_rejects_malformed_oversized_and_prunes_or_refuses_unknown_fields(
    cluster: Cluster, namespace: str, temper_crds: None, s3_server: S3Server, tiny_model: Path
) -> None:
    api = Api(cluster, namespace)
    base = quickstart_for(namespace, "bucket", "creds", s3_server)

    for kind, field, body in mutants(base):
        exc = rejection(api, body)
        assert exc is not None, f"{kind}: apiserver accepted a spec with a broken {field}"
        assert exc.status == 422, (kind, field, exc.status, exc.body)
        message = json.loads(exc.body)["message"]
        assert field in message, f"{kind}: rejection does not name {field}: {message[:600]}"

    huge_annotation = copy.deepcopy(base)
    huge_annotation["metadata"]["name"] = "huge-annotation"
    huge_annotation["metadata"]["annotations"] = {"note": "x" * (ANNOTATION_LIMIT + 1)}
    exc = rejection(api, huge_annotation)
    assert exc is not None
    assert exc.status == 422
    assert "metadata.annotations" in exc.body
    assert "Too long" in exc.body

    # Over the request limit: refused before decoding, so there is no field to name, only the size.
    huge_object = copy.deepcopy(base)
    huge_object["metadata"]["name"] = "huge-object"
    huge_object["spec"]["padding"] = "y" * (REQUEST_LIMIT + 1024)
    exc = rejection(api, huge_object)
    assert exc is not None
    assert exc.status == 413, (exc.status, exc.body[:300])

    unknown = copy.deepcopy(base)
    unknown["metadata"]["name"] = "unknown-fields"
    unknown["spec"]["turbo"] = True
    unknown["spec"]["stages"][0]["hyperparameters"]["warpFactor"] = 9
    exc = rejection(api, unknown, field_validation="Strict")
    assert exc is not None
    assert exc.status == 400, (exc.status, exc.body[:600])  # BadRequest: strict decoding failed
    message = json.loads(exc.body)["message"]
    assert 'unknown field "spec.turbo"' in message
    assert 'unknown field "spec.stages[0].hyperparameters.warpFactor"' in message
    assert rejection(api, unknown) is None  # default field validation: accepted, pruned
    stored = api.run("unknown-fields")["spec"]
    assert "turbo" not in stored
    assert "warpFactor" not in stored["stages"][0]["hyperparameters"]
    assert (
        stored["stages"][0]["hyperparameters"]["maxSteps"]
        == base["spec"]["stages"][0]["hyperparameters"]["maxSteps"]
    )


def test_operator_names_missing_secret_dead_storage_and_missing_model_while_a_good_run_completes(
    cluster: Cluster,
    namespace: str,
    operator: OperatorProcess,
    s3_server: S3Server,
    s3_bucket: str,
    s3_secret: str,
    tiny_model: Path,
) -> None:
    api = Api(cluster, namespace)
    base = good_run(quickstart_for(namespace, s3_bucket, s3_secret, s3_server), "good")
    no_retry = {"maxRetries": 0, "backoffSeconds": 1}

    def variant(name: str, edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        body = good_run(base, name)
        edit(body["spec"])
        return body

    def no_secret(spec: dict[str, Any]) -> None:
        spec["storage"]["secretRef"] = {"name": "late-creds"}
        spec["stages"][0]["retries"] = {"maxRetries": 2, "backoffSeconds": 3}

    def dead_storage(spec: dict[str, Any]) -> None:
        spec["storage"]["endpointUrl"] = f"http://127.0.0.1:{free_port()}"  # closed: nothing listens
        spec["stages"][0]["retries"] = no_retry

    def unknown_builtin(spec: dict[str, Any]) -> None:
        spec["baseModel"] = {"uri": "builtin://nope"}

    def missing_s3_model(spec: dict[str, Any]) -> None:
        spec["baseModel"] = {"uri": f"s3://{s3_bucket}/models/never-uploaded/"}

    runs = {
        "good": base,
        "no-secret": variant("no-secret", no_secret),
        "dead-storage": variant("dead-storage", dead_storage),
        "nope-model": variant("nope-model", unknown_builtin),
        "missing-model": variant("missing-model", missing_s3_model),
    }
    for body in runs.values():
        api.create_run(body)

    # A missing Secret stalls the run with the Secret named, instead of "Running" forever ...
    def secret_stall() -> dict[str, Any] | None:
        stalled = conditions(api, "no-secret").get("Stalled") or {}
        return stalled if stalled.get("status") == "True" else None

    stalled = wait_for("no-secret to stall", secret_stall, 90, operator)
    assert stalled["reason"] == "SecretNotFound", stalled
    assert "late-creds" in stalled["message"]
    no_secret_run = api.run("no-secret")
    assert no_secret_run["status"]["phase"] != "Running"
    assert conditions(api, "no-secret")["Reconciling"]["status"] == "False"
    # ... and creating it lets the run continue by itself.
    secret = api.core.read_namespaced_secret(s3_secret, namespace)
    api.core.create_namespaced_secret(namespace, {"metadata": {"name": "late-creds"}, "data": secret.data})

    # Dead storage and missing base models fail their stage with the cause in the message.
    expectations = {
        "dead-storage": ("StorageUnreachable", ["storage", "127.0.0.1"]),
        "nope-model": ("BaseModelNotFound", ["baseModel", "builtin://nope", "unknown builtin model"]),
        "missing-model": ("BaseModelNotFound", ["baseModel", "never-uploaded", "no objects"]),
    }
    for name, (cause, words) in expectations.items():
        wait_for(f"{name} to fail", finished(api, name), 180, operator)
        failed = conditions(api, name)["Failed"]
        assert failed["status"] == "True", (name, api.run(name)["status"])
        assert failed["reason"] == "StageFailed"
        for word in words:
            assert word in failed["message"], (name, word, failed["message"])
        stalled = conditions(api, name)["Stalled"]
        assert (stalled["status"], stalled["reason"]) == ("True", cause), (name, stalled)

    for name in ("good", "no-secret"):
        wait_for(f"{name} to finish", finished(api, name), 240, operator)
        assert api.succeeded(name), (name, api.run(name)["status"], operator.log()[-2000:])
    adapters = {a["metadata"]["name"]: a for a in api.adapters()}
    good_adapter = adapters[api.stage("good", "sft")["adapter"]]
    assert next(c for c in good_adapter["status"]["conditions"] if c["type"] == "Ready")["status"] == "True"

    assert healthz(operator) == 200
    assert operator.proc is not None
    assert operator.proc.poll() is None
    log = operator.log()
    assert "Traceback" not in log, log[-3000:]
    fake_secret = FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
    for name in runs:
        assert fake_secret not in str(api.run(name)), f"credentials leaked into {name}'s status"
    assert fake_secret not in log
    assert not any(fake_secret in (e.message or "") for name in runs for e in api.events(name))


def test_image_faults_get_the_kubelet_reasons_and_the_run_names_them(
    cluster: Cluster,
    namespace: str,
    operator: OperatorProcess,
    s3_server: S3Server,
    s3_bucket: str,
    s3_secret: str,
) -> None:
    """Trainer images that cannot work, run for real by the exec node's container runtime."""
    api = Api(cluster, namespace)
    base = good_run(quickstart_for(namespace, s3_bucket, s3_secret, s3_server), "img")
    images = {
        "wrong-image": f"{TRAINER_IMAGE}:no-such-tag",  # no registry has it
        "root-image": BASE_IMAGE,  # no USER: runs as root, which runAsNonRoot forbids
        "failing-image": f"{OPERATOR_IMAGE}:{IMAGE_TAG}",  # runs, but has no trainer: exits 1
    }
    for name, image in images.items():
        body = good_run(base, name)
        body["spec"]["trainer"] = {"image": image}
        body["spec"]["stages"][0]["retries"] = {"maxRetries": 0, "backoffSeconds": 1}
        api.create_run(body)

    def stalled(name: str) -> Callable[[], dict[str, Any] | None]:
        def probe() -> dict[str, Any] | None:
            cond = conditions(api, name).get("Stalled") or {}
            return cond if cond.get("status") == "True" else None

        return probe

    pulled = wait_for("wrong-image to stall", stalled("wrong-image"), 120, operator)
    assert pulled["reason"] in ("ErrImagePull", "ImagePullBackOff"), pulled
    assert images["wrong-image"] in pulled["message"]
    assert api.stage("wrong-image", "sft")["state"] == "Pending"

    root = wait_for("root-image to stall", stalled("root-image"), 120, operator)
    assert root["reason"] == "CreateContainerConfigError", root
    assert "runAsNonRoot" in root["message"]
    assert "image will run as root" in root["message"]
    assert api.stage("root-image", "sft")["state"] == "Pending"

    wait_for("failing-image to fail", finished(api, "failing-image"), 180, operator)
    failed = conditions(api, "failing-image")["Failed"]
    assert failed["status"] == "True", api.run("failing-image")["status"]
    # The container died before writing a result: its log tail is the termination message.
    assert "No module named temper_trainer" in failed["message"], failed
    assert "Traceback" not in operator.log(), operator.log()[-3000:]
