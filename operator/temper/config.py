"""Operator configuration, read once from the environment (``TEMPER_*``).

Every knob has a production default; tests shorten the intervals. Bad values fail at start-up
with an error naming the variable, never later in a reconcile.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from temper.api.common import ModelCache
from temper.policy import NETWORK_ENV, POLICY_ENV, PlatformPolicy, TrainerNetwork

T = TypeVar("T", PlatformPolicy, TrainerNetwork)


DEFAULT_TRAINER_IMAGE = "ghcr.io/temper/trainer:0.1.0"
DEFAULT_MODEL_CACHE_PATH = "/var/cache/temper/models"


class ConfigError(ValueError):
    """An invalid environment variable; the message names it."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name}: must be >= {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name}: must be >= {minimum}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {raw!r}")


def _quantity(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)?([KMGTPE]i?)?", raw):
        raise ConfigError(f"{name}: expected a byte quantity such as 512Mi or 2Gi, got {raw!r}")
    return raw


@dataclass(frozen=True)
class OperatorConfig:
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    image_pull_policy: str = "IfNotPresent"
    gpu_resource: str = "nvidia.com/gpu"
    # Empty: cluster-wide. Otherwise only these namespaces are watched.
    namespaces: tuple[str, ...] = ()
    metrics_port: int = 9090
    health_port: int = 8081
    bind_address: str = "0.0.0.0"  # noqa: S104 - probes and scrapes come from the kubelet/Prometheus
    default_storage_endpoint: str | None = None
    # Secret (in the run's namespace) with S3 credentials for runs whose storage names none.
    default_storage_secret: str | None = None
    progress_interval_seconds: float = 30.0
    trainer_progress_interval_seconds: int = 10
    trainer_metrics_port: int = 9400
    # A trainer pod keeps /metrics up at most this long after its stage, until a scrape read it.
    trainer_metrics_final_scrape_seconds: int = 0
    master_port: int = 29500
    backoff_cap_seconds: int = 3600
    # Leader election (coordination.k8s.io Lease).
    leader_election: bool = True
    lease_name: str = "temper-operator"
    lease_namespace: str = "default"
    lease_duration_seconds: float = 15.0
    # The leader stops writing this long after the start of its last successful renewal; it is
    # shorter than the lease, so a standby's takeover never overlaps it (client-go's rule).
    lease_renew_deadline_seconds: float = 10.0
    lease_renew_seconds: float = 2.0
    identity: str = field(default_factory=lambda: os.environ.get("HOSTNAME", "") or f"temper-{os.getpid()}")
    workers: int = 8
    # The platform policy (the chart's TEMPER_POLICY); None outside the chart: nothing re-checked.
    policy: PlatformPolicy | None = None
    trainer_network: TrainerNetwork = field(default_factory=TrainerNetwork)
    # Default requests and limits of trainer pods ({"requests": {...}, "limits": {...}}).
    trainer_resources: dict[str, dict[str, str]] = field(default_factory=dict)
    # Test builds only (the chaos campaign): pass a run's temper.dev/test-failpoints to its pods.
    test_failpoints: bool = False
    # Workers (and threads) for everything that talks to S3: progress, verification, continual
    # cycles, merges, retention. Separate from ``workers``, so S3 never holds up Job creation.
    storage_workers: int = 4
    # A Ready Adapter is re-verified (one GET and a HEAD per file) this often; 0: never.
    adapter_reverify_seconds: float = 3600.0
    # Hub endpoint (an internal mirror) passed to trainer pods as HF_ENDPOINT; None: the public Hub.
    hf_endpoint: str | None = None
    # Default model-cache volume for runs whose spec.trainer.modelCache is absent.
    model_cache: ModelCache = field(default_factory=ModelCache)
    model_cache_path: str = DEFAULT_MODEL_CACHE_PATH
    # Trainer pods: None leaves the UID to the image (or to the platform, e.g. OpenShift's SCC).
    trainer_run_as_user: int | None = None
    trainer_shm_size: str = "1Gi"
    trainer_tmp_size: str = "4Gi"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if env is None else env
        namespaces = tuple(n.strip() for n in env.get("TEMPER_NAMESPACES", "").split(",") if n.strip())
        duration = _float(env, "TEMPER_LEASE_DURATION_SECONDS", 15.0, 1.0)
        deadline = _float(env, "TEMPER_LEASE_RENEW_DEADLINE_SECONDS", min(10.0, duration * 2 / 3), 0.1)
        renew = _float(env, "TEMPER_LEASE_RENEW_SECONDS", min(2.0, deadline / 2), 0.1)
        if deadline >= duration:
            raise ConfigError(
                "TEMPER_LEASE_RENEW_DEADLINE_SECONDS: must be below TEMPER_LEASE_DURATION_SECONDS "
                f"({deadline} >= {duration})"
            )
        if renew >= deadline:
            raise ConfigError(
                "TEMPER_LEASE_RENEW_SECONDS: must be below TEMPER_LEASE_RENEW_DEADLINE_SECONDS "
                f"({renew} >= {deadline})"
            )
        image = env.get("TEMPER_TRAINER_IMAGE", "") or DEFAULT_TRAINER_IMAGE
        pull = env.get("TEMPER_IMAGE_PULL_POLICY", "") or "IfNotPresent"
        if pull not in ("Always", "IfNotPresent", "Never"):
            raise ConfigError(
                f"TEMPER_IMAGE_PULL_POLICY: expected Always, IfNotPresent or Never, got {pull!r}"
            )
        return cls(
            trainer_image=image,
            image_pull_policy=pull,
            gpu_resource=env.get("TEMPER_GPU_RESOURCE", "") or "nvidia.com/gpu",
            namespaces=namespaces,
            metrics_port=_int(env, "TEMPER_METRICS_PORT", 9090, 0),
            health_port=_int(env, "TEMPER_HEALTH_PORT", 8081, 0),
            bind_address=env.get("TEMPER_BIND_ADDRESS", "") or "0.0.0.0",  # noqa: S104
            default_storage_endpoint=env.get("TEMPER_DEFAULT_STORAGE_ENDPOINT") or None,
            default_storage_secret=env.get("TEMPER_DEFAULT_STORAGE_SECRET") or None,
            progress_interval_seconds=_float(env, "TEMPER_PROGRESS_INTERVAL_SECONDS", 30.0, 0.1),
            trainer_progress_interval_seconds=_int(env, "TEMPER_TRAINER_PROGRESS_INTERVAL_SECONDS", 10, 1),
            trainer_metrics_port=_int(env, "TEMPER_TRAINER_METRICS_PORT", 9400, 1),
            trainer_metrics_final_scrape_seconds=_int(
                env, "TEMPER_TRAINER_METRICS_FINAL_SCRAPE_SECONDS", 0, 0
            ),
            master_port=_int(env, "TEMPER_MASTER_PORT", 29500, 1),
            backoff_cap_seconds=_int(env, "TEMPER_BACKOFF_CAP_SECONDS", 3600, 0),
            leader_election=_bool(env, "TEMPER_LEADER_ELECTION", True),
            lease_name=env.get("TEMPER_LEASE_NAME", "") or "temper-operator",
            lease_namespace=env.get("TEMPER_LEASE_NAMESPACE", "")
            or env.get("POD_NAMESPACE", "")
            or "default",
            lease_duration_seconds=duration,
            lease_renew_deadline_seconds=deadline,
            lease_renew_seconds=renew,
            identity=env.get("TEMPER_IDENTITY", "") or env.get("HOSTNAME", "") or f"temper-{os.getpid()}",
            workers=_int(env, "TEMPER_WORKERS", 8, 1),
            storage_workers=_int(env, "TEMPER_STORAGE_WORKERS", 4, 1),
            adapter_reverify_seconds=_float(env, "TEMPER_ADAPTER_REVERIFY_SECONDS", 3600.0, 0.0),
            hf_endpoint=_hf_endpoint(env),
            model_cache=_model_cache(env),
            model_cache_path=_abs_path(env, "TEMPER_MODEL_CACHE_PATH", DEFAULT_MODEL_CACHE_PATH),
            policy=_policy(env, image),
            trainer_network=_settings(TrainerNetwork, env, NETWORK_ENV),
            test_failpoints=_bool(env, "TEMPER_TEST_FAILPOINTS", False),
            trainer_resources=_trainer_resources(env),
            trainer_run_as_user=_int(env, "TEMPER_TRAINER_RUN_AS_USER", -1, 1)
            if env.get("TEMPER_TRAINER_RUN_AS_USER")
            else None,
            trainer_shm_size=_quantity(env, "TEMPER_TRAINER_SHM_SIZE", "1Gi"),
            trainer_tmp_size=_quantity(env, "TEMPER_TRAINER_TMP_SIZE", "4Gi"),
        )


def _hf_endpoint(env: Mapping[str, str]) -> str | None:
    raw = env.get("TEMPER_HF_ENDPOINT", "").strip().rstrip("/")
    if raw and not raw.startswith(("http://", "https://")):
        raise ConfigError(f"TEMPER_HF_ENDPOINT: expected an http(s):// URL, got {raw!r}")
    return raw or None


def _abs_path(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "") or default
    if not raw.startswith("/") or ".." in raw.split("/"):
        raise ConfigError(f"{name}: expected an absolute path, got {raw!r}")
    return raw


def _model_cache(env: Mapping[str, str]) -> ModelCache:
    """TEMPER_MODEL_CACHE_{TYPE,SIZE,CLAIM,STORAGE_CLASS}, validated by the API model itself."""
    from pydantic import ValidationError

    fields = {
        "type": env.get("TEMPER_MODEL_CACHE_TYPE", "") or "emptyDir",
        "size": env.get("TEMPER_MODEL_CACHE_SIZE") or None,
        "claimName": env.get("TEMPER_MODEL_CACHE_CLAIM") or None,
        "storageClassName": env.get("TEMPER_MODEL_CACHE_STORAGE_CLASS") or None,
    }
    try:
        return ModelCache.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "type"
        raise ConfigError(f"TEMPER_MODEL_CACHE_*: {where}: {first['msg']}") from None


def _settings(model: type[T], env: Mapping[str, str], name: str) -> T:
    from pydantic import ValidationError

    try:
        return model.from_env(env)
    except (ValueError, ValidationError) as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _trainer_resources(env: Mapping[str, str]) -> dict[str, dict[str, str]]:
    import json

    raw = env.get("TEMPER_TRAINER_RESOURCES", "").strip()
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        raise ConfigError("TEMPER_TRAINER_RESOURCES: not JSON") from None
    ok = isinstance(value, dict) and set(value) <= {"requests", "limits"}
    if not ok or not all(isinstance(v, dict) for v in value.values()):
        raise ConfigError("TEMPER_TRAINER_RESOURCES: expected {requests: {...}, limits: {...}}")
    return {k: {str(n): str(q) for n, q in v.items()} for k, v in value.items()}


def _policy(env: Mapping[str, str], trainer_image: str) -> PlatformPolicy | None:
    if not env.get(POLICY_ENV, "").strip():
        return None
    policy = _settings(PlatformPolicy, env, POLICY_ENV)
    if not policy.default_trainer_image:
        policy = policy.model_copy(update={"default_trainer_image": trainer_image})
    return policy
