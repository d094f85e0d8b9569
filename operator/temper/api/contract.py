"""The stage contract: the one JSON document the operator hands the trainer for one stage.

The operator renders it from a PostTrainingRun; the trainer validates it with this same model.
It travels in the pod's environment (``TEMPER_STAGE_CONTRACT``), never in a mounted file, so any
node can run the pod. Credentials are never part of it: they arrive as separate env vars from
Secrets (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``).

Storage layout for one stage output (``StageContract.output.prefix``)::

    <prefix>/attempts/<attempt>/adapter_config.json     immutable, one folder per attempt
    <prefix>/attempts/<attempt>/adapter_model.safetensors
    <prefix>/attempts/<attempt>/progress.json           live progress, overwritten
    <prefix>/checkpoints/step-<n>/...                    resumable state, shared by attempts
    <prefix>/manifest.json                               written last, If-None-Match: *

Readers trust only ``manifest.json`` and verify every file it lists.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CONTRACT_ENV = "TEMPER_STAGE_CONTRACT"
# The pod's CPUs for its math threads (its CPU limit, else request, rounded down); set by the operator.
CPU_THREADS_ENV = "TEMPER_CPU_THREADS"
CONTRACT_KIND = "StageContract"

# Trainer exit codes. The operator's podFailurePolicy maps the non-retryable ones to FailJob.
EXIT_OK = 0
EXIT_RETRYABLE = 1  # anything unexpected: Job backoff retries it
EXIT_INVALID_CONTRACT = 10  # the contract failed validation: retrying cannot help
EXIT_INVALID_INPUT = 11  # data or base model unusable (missing, wrong format)
EXIT_UNSUPPORTED = 12  # e.g. QLoRA without a GPU
EXIT_PREEMPTED = 143  # SIGTERM handled: checkpoint written, safe to resume
NON_RETRYABLE_EXIT_CODES = (EXIT_INVALID_CONTRACT, EXIT_INVALID_INPUT, EXIT_UNSUPPORTED)


class _Strict(BaseModel):
    # NaN and infinity travel as "NaN"/"Infinity" (JSON has neither; pydantic's default, null,
    # would make a diverged stage's result unreadable) and are read back as floats.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, ser_json_inf_nan="strings")


StageType = Literal["sft", "dpo", "grpo", "reward-model", "synthetic-preferences", "eval", "merge"]
PeftMethod = Literal["full", "lora", "qlora", "adalora", "prompt-tuning", "prefix-tuning", "p-tuning"]
DatasetFormat = Literal["chat", "prompt-completion", "preference", "prompt"]


class StorageConfig(_Strict):
    """S3-compatible store. Any endpoint works: AWS, MinIO, Ceph RGW, versitygw, moto."""

    endpoint_url: str | None = Field(None, alias="endpointUrl")
    region: str = "us-east-1"
    addressing_style: Literal["path", "virtual", "auto"] = Field("path", alias="addressingStyle")
    multipart_threshold_bytes: int = Field(
        64 * 1024 * 1024, alias="multipartThresholdBytes", ge=5 * 1024 * 1024
    )
    multipart_chunk_bytes: int = Field(16 * 1024 * 1024, alias="multipartChunkBytes", ge=5 * 1024 * 1024)


class DatasetSpec(_Strict):
    name: str
    uri: str  # s3://bucket/key.jsonl|.parquet, /local/path, or builtin://name[?n=..&seed=..]
    format: DatasetFormat = "prompt-completion"
    task: str | None = None  # tag used for per-task replay balancing and eval grouping


class CurriculumSpec(_Strict):
    order_by: Literal["none", "length", "score", "dataset"] = Field("none", alias="orderBy")
    score_field: str | None = Field(None, alias="scoreField")


class ReplaySpec(_Strict):
    ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    datasets: list[DatasetSpec] = []  # the replay buffer's contents
    sampling: Literal["uniform", "per-task-balanced"] = "uniform"
    max_examples: int | None = Field(None, alias="maxExamples", ge=1)
    seed: int = 0


class StageData(_Strict):
    train: list[DatasetSpec] = []
    eval: list[DatasetSpec] = []
    curriculum: CurriculumSpec = CurriculumSpec()
    replay: ReplaySpec = ReplaySpec()


class PeftSpec(_Strict):
    method: PeftMethod = "lora"
    r: int = Field(8, ge=1, le=1024)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["all-linear"], alias="targetModules")
    bits: Literal[4, 8] | None = None  # qlora only
    init_r: int | None = Field(None, alias="initR", ge=1)  # adalora
    num_virtual_tokens: int = Field(8, alias="numVirtualTokens", ge=1)  # prompt/prefix/p-tuning


Precision = Literal["auto", "bf16", "fp16", "fp32"]
AttnImplementation = Literal["sdpa", "flash_attention_2", "eager"]
# TRL 1.16's DPOConfig.loss_type and GRPOConfig.loss_type values; each stage type takes its own
LossType = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "grpo",
    "dr_grpo",
    "dapo",
    "bnpo",
    "cispo",
    "sapo",
    "luspo",
    "vespo",
]
GRPO_LOSS_TYPES: tuple[str, ...] = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
DPO_LOSS_TYPES: tuple[str, ...] = tuple(t for t in get_args(LossType) if t not in GRPO_LOSS_TYPES)


class Hyperparameters(_Strict):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, alias="maxSteps", ge=1)
    learning_rate: float = Field(2e-4, alias="learningRate", gt=0)
    batch_size: int = Field(8, alias="batchSize", ge=1)
    gradient_accumulation_steps: int = Field(1, alias="gradientAccumulationSteps", ge=1)
    max_length: int = Field(512, alias="maxLength", ge=8)
    packing: bool = False
    warmup_ratio: float = Field(0.0, alias="warmupRatio", ge=0, le=1)
    beta: float = Field(0.1, gt=0)  # dpo / grpo KL coefficient
    num_generations: int = Field(4, alias="numGenerations", ge=2)  # grpo / synthetic-preferences
    max_new_tokens: int = Field(16, alias="maxNewTokens", ge=1)
    temperature: float = Field(1.0, gt=0)
    # Weight of the chosen answers' NLL added to the DPO loss (RPO). Unset means the dpo stage's
    # default of 1.0: pure DPO (0) stalls near 70% preference accuracy on small models.
    rpo_alpha: float | None = Field(None, alias="rpoAlpha", ge=0)
    # TRL's knobs, mapped onto each trainer's config (temper_trainer.stages._trl_common)
    precision: Precision = "auto"  # auto: bf16 on a CUDA GPU that supports it, else fp32
    gradient_checkpointing: bool = Field(False, alias="gradientCheckpointing")
    attn_implementation: AttnImplementation | None = Field(None, alias="attnImplementation")
    liger: bool = False  # Liger kernels (needs liger-kernel and a CUDA GPU)
    loss_type: LossType | None = Field(None, alias="lossType")  # dpo / grpo
    num_iterations: int = Field(1, alias="numIterations", ge=1, le=64)  # grpo: updates per generation
    # Gradient clipping (TRL's max_grad_norm); 0 disables it.
    max_grad_norm: float = Field(1.0, alias="maxGradNorm", ge=0)
    # synthetic-preferences: a pair is kept only when the teacher's scores differ by at least this
    min_margin: float = Field(0.0, alias="minMargin", ge=0)


class RewardSpec(_Strict):
    """A reward for grpo and synthetic-preferences: a built-in function or a reward model."""

    type: Literal["exact-match", "regex", "length", "reward-model"]
    weight: float = 1.0
    pattern: str | None = None  # regex
    target_length: int | None = Field(None, alias="targetLength", ge=1)  # length
    model: AdapterRef | None = None  # reward-model


class AdapterRef(_Strict):
    """A published stage output, addressed by its manifest."""

    name: str | None = None  # the Adapter object's name, for lineage
    manifest_uri: str = Field(alias="manifestUri")
    weight: float = 1.0  # merge only


# The suite metrics a PostTrainingRun may name (api.run re-uses this).
Metric = Literal[
    "exact_match",
    "loss",
    "perplexity",
    "preference_accuracy",
    "distinct_n",
    "self_bleu",
    "kl_to_reference",
    "safety",
    "robustness",
    "judge",
]


class EvalSuite(_Strict):
    name: str
    dataset: DatasetSpec
    metric: Metric
    max_regression: float | None = Field(None, alias="maxRegression", ge=0)
    judge: AdapterRef | None = None  # judge: the reward model that scores completions

    @model_validator(mode="after")
    def _judge_only_for_judge(self) -> EvalSuite:
        if (self.metric == "judge") != (self.judge is not None):
            raise ValueError("judge: a judge suite needs judge (the reward model); other metrics take none")
        return self


class MergeSpec(_Strict):
    method: Literal["linear", "ties", "dare_ties", "cat"] = "linear"
    density: float | None = Field(None, gt=0, le=1)


class CheckpointPolicy(_Strict):
    every_steps: int | None = Field(50, alias="everySteps", ge=1)
    every_seconds: int | None = Field(600, alias="everySeconds", ge=1)
    keep: int = Field(2, ge=1)


Strategy = Literal["auto", "ddp", "fsdp"]


class ResourcesSpec(_Strict):
    """Compute the stage was given: the launcher starts one process per GPU (one on CPU) per node."""

    gpus_per_node: int = Field(0, alias="gpusPerNode", ge=0)
    nodes: int = Field(1, ge=1)
    strategy: Strategy = "auto"  # auto: DDP for adapters, FSDP for full or a model too big for one device


class Topology(_Strict):
    """What the attempt actually ran on, reported back in ``StageResult`` and the run's status."""

    world_size: int = Field(1, alias="worldSize", ge=1)
    nodes: int = Field(1, ge=1)
    procs_per_node: int = Field(1, alias="procsPerNode", ge=1)
    gpus_per_node: int = Field(0, alias="gpusPerNode", ge=0)
    strategy: Literal["single", "ddp", "fsdp"] = "single"


class RunRef(_Strict):
    namespace: str
    name: str
    uid: str = ""
    cycle: int = Field(1, ge=1)  # continual-learning generation; 1 for one-shot runs


class StageRef(_Strict):
    name: str
    type: StageType
    attempt: int = Field(1, ge=1)


class OutputSpec(_Strict):
    prefix: str  # s3://bucket/path/ of this stage's output; see the module docstring


class StageContract(_Strict):
    api_version: Literal["temper.dev/v1alpha1"] = Field("temper.dev/v1alpha1", alias="apiVersion")
    kind: Literal["StageContract"] = "StageContract"
    run: RunRef
    stage: StageRef
    base_model: str = Field(alias="baseModel")  # builtin://tiny, s3://..., /path
    storage: StorageConfig = StorageConfig()
    output: OutputSpec
    parent: AdapterRef | None = None  # the `from` stage's adapter
    # eval only: what suites with maxRegression are compared against, measured in the same stage
    # (the evaluated adapter's parent); None with a parent means the base model
    baseline: AdapterRef | None = None
    peft: PeftSpec = PeftSpec()
    data: StageData = StageData()
    hyperparameters: Hyperparameters = Hyperparameters()
    rewards: list[RewardSpec] = []
    suites: list[EvalSuite] = []
    merge: MergeSpec | None = None
    merge_sources: list[AdapterRef] = Field([], alias="mergeSources")
    checkpoint: CheckpointPolicy = CheckpointPolicy()
    resources: ResourcesSpec = ResourcesSpec()
    seed: int = 42
    progress_interval_seconds: int = Field(10, alias="progressIntervalSeconds", ge=1)
    metrics_port: int | None = Field(None, alias="metricsPort", ge=1, le=65535)
    # After the stage, keep /metrics up until one scrape read the final values, at most this long.
    metrics_final_scrape_seconds: int | None = Field(None, alias="metricsFinalScrapeSeconds", ge=0, le=600)

    def to_env(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)

    def contract_hash(self) -> str:
        """sha256 of what an attempt runs, the attempt number excluded: the same for every attempt."""
        neutral = self.model_copy(update={"stage": self.stage.model_copy(update={"attempt": 1})})
        return hashlib.sha256(neutral.to_env().encode()).hexdigest()

    @classmethod
    def from_env(cls, raw: str) -> StageContract:
        return cls.model_validate(json.loads(raw))


class StageProgress(_Strict):
    """Live progress, written by the trainer to ``<attempt prefix>/progress.json``.

    The operator reads it with the run's storage credentials; trainer pods need no API access.
    """

    step: int = 0
    total_steps: int = Field(0, alias="totalSteps")
    percent: float = 0.0
    loss: float | None = None
    eta_seconds: float | None = Field(None, alias="etaSeconds")
    tokens_per_second: float | None = Field(None, alias="tokensPerSecond")
    updated_at: str = Field("", alias="updatedAt")  # RFC 3339
    phase: Literal["starting", "training", "evaluating", "publishing", "done"] = "starting"


class SuiteResult(_Strict):
    """One eval suite's result, with the baseline its regression gate compares against."""

    suite: str
    metric: str
    value: float
    examples: int = Field(0, ge=0)
    max_regression: float | None = Field(None, alias="maxRegression", ge=0)
    baseline: float | None = None  # the same suite on the baseline model, when gated
    baseline_source: str | None = Field(None, alias="baselineSource")  # "adapter <name>" or "base model"
    # judge: share of prompts the judge scores above the baseline's completion (ties half)
    win_rate: float | None = Field(None, alias="winRate", ge=0, le=1)


class StageResult(_Strict):
    """The final result, written to the pod's termination message (kept far below 4 KiB)."""

    manifest_uri: str | None = Field(None, alias="manifestUri")
    sha256: str | None = None  # of manifest.json
    metrics: dict[str, float] = {}
    evals: list[SuiteResult] = []  # eval stages: one per suite, never dropped for size
    error: str | None = None
    topology: Topology | None = None


FileEntry = dict[str, Any]


class ManifestFile(_Strict):
    path: str  # relative to the manifest's folder
    sha256: str

    size: int = Field(ge=0)
    # What the store reported at publish, so verification is one HEAD (temper.storage): its
    # x-amz-checksum-sha256 (a multipart object's is "<parts' checksum>-<N>"), else its ETag.
    checksum_sha256: str | None = Field(None, alias="checksumSha256")
    etag: str | None = None

    @field_validator("path")
    @classmethod
    def _inside_the_folder(cls, path: str) -> str:
        # A manifest names files in its own folder only: never an absolute or ".." path.
        parts = path.split("/")
        if path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"{path!r}: not a path inside the manifest's folder")
        return path


class Manifest(_Strict):
    """``manifest.json``: the only object a reader trusts. Written last."""

    schema_version: Literal[1] = Field(1, alias="schemaVersion")
    files: list[ManifestFile]
    base_model: str = Field(alias="baseModel")
    method: PeftMethod
    stage_type: StageType = Field(alias="stageType")
    metrics: dict[str, float] = {}
    evals: list[SuiteResult] = []  # eval stages: the suites' results with their baselines
    lineage: dict[str, Any] = {}
    trainer_version: str = Field(alias="trainerVersion")
    created_at: str = Field(alias="createdAt")
    servable: dict[str, bool] = {}


AdapterRef.model_rebuild()
RewardSpec.model_rebuild()
