"""Adapter: one published, verified set of adapter weights; the catalog entry serving systems read.

The operator creates one per stage output (labelled ``temper.dev/run`` and ``temper.dev/stage``);
users create them by hand to register an external artifact or to merge existing adapters.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import model_validator

from temper.api import contract
from temper.api.common import (
    DNS_LABEL_MAX,
    DNS_SUBDOMAIN_MAX,
    ApiModel,
    Condition,
    FieldError,
    ModelSource,
    S3Options,
    cel,
    conditions_field,
    doc,
    immutable,
    rule,
    unique_names,
)

KIND = "Adapter"
PLURAL = "adapters"

Lifecycle = Literal["active", "retired"]
AdapterPhase = Literal["Pending", "Verifying", "Ready", "Failed", "Retired", "Deleting"]
MANIFEST_URI = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/(.*/)?manifest\.json$"


class Artifact(S3Options):
    """The adapter's files in object storage, addressed by their manifest.json."""

    uri: str = doc(
        "s3://bucket/.../manifest.json: the manifest lists every file with its sha256 and size and is "
        "verified "
        "before the Adapter becomes Ready. For a merge, where the merged adapter is written.",
        max_length=1024,
        pattern=MANIFEST_URI,
    )


class Retention(ApiModel):
    """What happens to the artifact when the Adapter is retired or deleted."""

    on_retire: Literal["keep", "delete"] = doc(
        "keep the files, or delete them (a finalizer removes the objects before the Adapter goes away).",
        default="keep",
    )


class MergeSource(ApiModel):
    """An Adapter going into a merge."""

    name: str = doc("Name of an Adapter in this namespace.", max_length=DNS_SUBDOMAIN_MAX)
    weight: float = doc("Relative weight.", default=1.0, gt=0)


_DENSITY = "density: only ties and dare_ties take density"


class AdapterMerge(ApiModel):
    """Build this adapter by merging others (PEFT's add_weighted_adapter)."""

    model_config = {
        "json_schema_extra": cel(
            rule("!has(self.density) || self.method in ['ties', 'dare_ties']", _DENSITY, ".density")
        )
    }

    sources: list[MergeSource] = doc(
        "Adapters to merge: at least two, each once.",
        min_length=2,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    method: Literal["linear", "ties", "dare_ties", "cat"] = doc(
        "linear, ties, dare_ties or cat (concatenate ranks).", default="linear"
    )
    density: float | None = doc(
        "Fraction of weights kept by ties and dare_ties, in (0, 1].", default=None, gt=0, le=1
    )

    @model_validator(mode="after")
    def _checks(self) -> AdapterMerge:
        unique_names(self.sources, "sources")
        if self.density is not None and self.method not in ("ties", "dare_ties"):
            raise FieldError(_DENSITY)
        return self

    def to_contract(self) -> contract.MergeSpec:
        return contract.MergeSpec(method=self.method, density=self.density)


_LIFECYCLE = "spec.lifecycle: a retired adapter cannot become active again"
_MERGE_IMMUTABLE = "spec.merge is immutable"


class AdapterSpec(ApiModel):
    """Desired state of an Adapter."""

    model_config = {
        "json_schema_extra": cel(
            rule("has(self.merge) == has(oldSelf.merge)", _MERGE_IMMUTABLE, ".merge"),
        )
    }

    base_model: ModelSource = doc(
        "The base model the adapter was trained on. Immutable.", json_schema_extra=immutable("spec.baseModel")
    )
    artifact: Artifact = doc("Where the files are. Immutable.", json_schema_extra=immutable("spec.artifact"))
    method: contract.PeftMethod = doc(
        "PEFT method: lora, qlora, adalora, prompt-tuning, prefix-tuning, p-tuning or full. Immutable.",
        json_schema_extra=immutable("spec.method"),
    )
    task: str | None = doc(
        "What the adapter is for, e.g. customer-support.", default=None, max_length=DNS_LABEL_MAX
    )
    tags: list[str] = doc(
        "Free-form labels for search, e.g. en or tone:friendly.", default_factory=list, max_length=32
    )
    lifecycle: Lifecycle = doc(
        "active, or retired (hidden from serving; may not become active again).",
        default="active",
        json_schema_extra=cel(rule("!(oldSelf == 'retired' && self == 'active')", _LIFECYCLE)),
    )
    retention: Retention | None = doc("Artifact retention; keep when absent.", default=None)
    merge: AdapterMerge | None = doc(
        "Build this adapter by merging others. Immutable.",
        default=None,
        json_schema_extra=immutable("spec.merge"),
    )

    field_schema: ClassVar[dict[str, dict[str, Any]]] = {"tags": {"itemMaxLength": 63}}


class ArtifactStatus(ApiModel):
    """What verification found in the manifest."""

    sha256: str | None = doc("sha256 of manifest.json.", default=None, max_length=64)
    size_bytes: int | None = doc("Total size of the listed files.", default=None, ge=0)
    files: int | None = doc("Number of listed files.", default=None, ge=0)
    verified_at: str | None = doc("When every file was last verified (RFC 3339).", default=None)


class DatasetLineage(ApiModel):
    """One dataset the adapter's stage read, pinned as far as its source allows."""

    name: str = doc("The spec.datasets name.", max_length=DNS_SUBDOMAIN_MAX)
    uri: str = doc("Where it was read from.", max_length=2048)
    version: str | None = doc(
        "The object's version id (S3), the pinned commit (hf://), or the trainer version (builtin://).",
        default=None,
        max_length=256,
    )
    etag: str | None = doc("The object's ETag (S3).", default=None, max_length=256)
    sha256: str | None = doc(
        "sha256 of the content: the file (local), the generated records (builtin://), or the store's "
        "full-object checksum (S3, when uploaded with one).",
        default=None,
        max_length=128,
    )


class Lineage(ApiModel):
    """Where the adapter came from."""

    run: str | None = doc("The PostTrainingRun that produced it.", default=None, max_length=DNS_SUBDOMAIN_MAX)
    stage: str | None = doc("The stage that produced it.", default=None, max_length=DNS_LABEL_MAX)
    generation: int | None = doc("The continual cycle that produced it.", default=None, ge=1)
    datasets: list[DatasetLineage] = doc(
        "The datasets the stage read (training, eval, replay, suites).", default_factory=list, max_length=256
    )
    parent: str | None = doc(
        "The Adapter it was trained from, if any.", default=None, max_length=DNS_SUBDOMAIN_MAX
    )
    parent_uri: str | None = doc("The parent's manifest.json, if any.", default=None, max_length=1024)
    sources: list[str] = doc("Merge sources, if merged.", default_factory=list, max_length=16)
    trainer_version: str | None = doc("Trainer version that wrote it.", default=None, max_length=128)
    base_model: str | None = doc("The base model's URI, as the run named it.", default=None)
    base_model_revision: str | None = doc(
        "The commit an hf:// base model was pinned to (a branch or tag resolved when the stage started).",
        default=None,
        max_length=64,
    )
    contract_hash: str | None = doc(
        "sha256 of the stage contract the trainer ran (attempt number excluded).", default=None, max_length=64
    )


class Servable(ApiModel):
    """Which serving systems can load the adapter."""

    vllm: bool = doc("vLLM LoRA serving (lora, qlora, adalora; not prompt/prefix tuning).", default=False)


class AdapterEval(ApiModel):
    """One eval suite's latest result on this adapter, from an eval stage."""

    metric: str = doc("The suite's metric.", max_length=64)
    value: float | None = doc("This adapter's value; absent when it was not a number.", default=None)
    examples: int | None = doc("Examples evaluated.", default=None, ge=0)
    baseline: float | None = doc("The baseline's value, measured in the same eval stage.", default=None)
    baseline_source: str | None = doc(
        "What the baseline is: the evaluated adapter's parent (adapter <name>), else the base model.",
        default=None,
        max_length=512,
    )
    max_regression: float | None = doc("The suite's maxRegression, if gated.", default=None, ge=0)
    regression: float | None = doc("Relative drop from the baseline; positive is worse.", default=None)
    win_rate: float | None = doc(
        "judge suites: share of prompts whose completion the judge scores above the baseline's (ties "
        "count half).",
        default=None,
        ge=0,
        le=1,
    )
    outcome: Literal["Passed", "Failed", "NoBaseline", "Reported"] = doc(
        "The regression gate's verdict; Reported when the suite has no maxRegression."
    )
    run: str = doc("The PostTrainingRun whose eval stage measured it.", max_length=DNS_SUBDOMAIN_MAX)
    stage: str = doc("The eval stage.", max_length=DNS_LABEL_MAX)
    cycle: int | None = doc("The run's cycle.", default=None, ge=1)
    time: str | None = doc("When the eval stage finished (RFC 3339).", default=None)


class AdapterStatus(ApiModel):
    """Observed state of an Adapter. Written only by the operator."""

    observed_generation: int | None = doc("metadata.generation the status reflects.", default=None, ge=0)
    phase: AdapterPhase | None = doc("Pending, Verifying, Ready, Failed, Retired or Deleting.", default=None)
    conditions: list[Condition] = conditions_field()
    artifact: ArtifactStatus | None = doc("Verified artifact facts.", default=None)
    metrics: dict[str, float] = doc(
        "What the producing stage reported in its manifest, e.g. eval/exact_match, train/loss.",
        default_factory=dict,
    )
    evals: dict[str, AdapterEval] = doc(
        "Eval stages' results on this adapter, keyed by suite name: the latest run's value, baseline and "
        "verdict.",
        default_factory=dict,
    )
    lineage: Lineage | None = doc("Provenance.", default=None)
    servable: Servable | None = doc("Serving compatibility.", default=None)
    aliases: list[str] = doc(
        "Names of the aliases currently pointing here, e.g. [production, canary]: a read-only "
        "mirror of the promoting run's status.aliases, updated on promotion and rollback.",
        default_factory=list,
        max_length=16,
    )

    field_schema: ClassVar[dict[str, dict[str, Any]]] = {
        "evals": {"maxItems": 64},
        "metrics": {"maxItems": 256},
    }


class Adapter(ApiModel):
    """A verified adapter artifact in the catalog: lineage, evals, lifecycle and serving compatibility."""

    api_version: Literal["temper.dev/v1alpha1"] = doc("temper.dev/v1alpha1", default="temper.dev/v1alpha1")
    kind: Literal["Adapter"] = doc("Adapter", default="Adapter")
    metadata: dict[str, Any] = doc("Standard object metadata.", default_factory=dict)
    spec: AdapterSpec
    status: AdapterStatus | None = None
