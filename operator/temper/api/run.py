"""PostTrainingRun: one object describes a whole post-training pipeline, one-shot or recurring.

Stage-level types extend the stage contract's (``temper.api.contract``) where the shapes agree
(PEFT, hyperparameters, checkpointing, curriculum, merge), so mapping a stage onto its
``StageContract`` is field-for-field. Where the run refers to things by *name* (datasets, stages,
adapters) the contract carries the resolved objects instead; :meth:`PostTrainingRunSpec.dataset`
and friends do that resolution.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from temper.api import contract
from temper.api.common import (
    DATA_URI,
    DNS_LABEL,
    DNS_LABEL_MAX,
    DNS_SUBDOMAIN,
    DNS_SUBDOMAIN_MAX,
    QUANTITY_PATTERN,
    ApiMixin,
    ApiModel,
    Condition,
    FieldError,
    ModelCache,
    ModelSource,
    S3Options,
    cel,
    conditions_field,
    doc,
    immutable,
    rule,
    unique_names,
)

KIND = "PostTrainingRun"
PLURAL = "posttrainingruns"

MAX_STAGES = 16
MAX_DATASETS = 32
STAGE_NAME_MAX = 32  # keeps "<run>-<stage>-<attempt>" Job names within 63 characters
TRAINING_TYPES = ("sft", "dpo", "grpo", "reward-model", "synthetic-preferences")
PREFERENCE_TYPES = ("dpo", "reward-model")
REWARDED_TYPES = ("grpo", "synthetic-preferences")
S3_URI = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$"

Quantity = int | str
_QUANTITY_SCHEMA = {"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN}


def _cel_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


# -- datasets ----------------------------------------------------------------------------------


class Dataset(ApiMixin, contract.DatasetSpec):
    """A named dataset; stages refer to it by name in data.train, data.eval, data.replay and suites."""

    name: str = doc(
        "Unique name within the run, referenced by stages.", max_length=DNS_LABEL_MAX, pattern=DNS_LABEL
    )
    uri: str = doc(
        "s3://bucket/key.jsonl or .parquet (read with spec.storage's credentials); "
        "hf://datasets/org/name[@revision] with an optional /path/in/repo or ?split=name (default "
        "train; Parquet and JSON Lines files, laid out as the datasets library expects; pinned to a "
        "commit like base models); an absolute path in the trainer image; or "
        "builtin://<task>?n=<count>&seed=<int>&split=train|eval (tasks: arith, "
        "subtract) for offline demos and tests.",
        max_length=1024,
        pattern=DATA_URI,
    )
    task: str | None = doc(
        "Task tag for per-task replay balancing and eval grouping.", default=None, max_length=DNS_LABEL_MAX
    )

    field_docs: ClassVar[dict[str, str]] = {
        "format": "Record shape: chat ({messages}), prompt-completion ({prompt, completion}), "
        "preference ({prompt, chosen, rejected}) or prompt ({prompt, answer?}).",
    }


# -- stage building blocks -----------------------------------------------------------------------

_QLORA_BITS = "bits: qlora requires bits (4 or 8); other methods take no bits"
_ADALORA_INIT_R = "initR: only adalora takes initR"


class Peft(ApiMixin, contract.PeftSpec):
    """Parameter-efficient fine-tuning settings, named as in Hugging Face PEFT."""

    model_config = {
        "json_schema_extra": cel(
            rule("self.method == 'qlora' ? has(self.bits) : !has(self.bits)", _QLORA_BITS, ".bits"),
            rule("!has(self.initR) || self.method == 'adalora'", _ADALORA_INIT_R, ".initR"),
        )
    }

    field_docs: ClassVar[dict[str, str]] = {
        "method": "full (no adapter), lora, qlora (LoRA on a 4/8-bit quantized base; needs a GPU), adalora, "
        "prompt-tuning, prefix-tuning or p-tuning.",
        "r": "LoRA rank (lora, qlora; AdaLoRA's target rank).",
        "alpha": "LoRA scaling numerator (lora_alpha).",
        "dropout": "LoRA dropout probability.",
        "targetModules": "Modules to adapt; all-linear adapts every linear layer except the output head.",
        "bits": "Quantization of the frozen base for qlora: 4 or 8. Required for qlora, forbidden otherwise.",
        "initR": "AdaLoRA's initial rank before pruning down to r. adalora only.",
        "numVirtualTokens": "Virtual tokens for prompt-tuning, prefix-tuning and p-tuning.",
    }
    field_schema: ClassVar[dict[str, dict[str, Any]]] = {
        "targetModules": {"maxItems": 32, "itemMaxLength": 128}
    }

    @model_validator(mode="after")
    def _method_options(self) -> Peft:
        if (self.method == "qlora") != (self.bits is not None):
            raise FieldError(_QLORA_BITS)
        if self.init_r is not None and self.method != "adalora":
            raise FieldError(_ADALORA_INIT_R)
        return self


class Hyperparameters(ApiModel):
    """Optimisation settings, named as in transformers' TrainingArguments and TRL.

    Every field is optional with no schema default: which ones a stage may set depends on its type
    (``STAGE_HYPERPARAMETERS``), and the stage contract (``temper.api.contract.Hyperparameters``)
    supplies the defaults for the ones left out.
    """

    epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, ge=1)
    learning_rate: float | None = Field(None, gt=0)
    batch_size: int | None = Field(None, ge=1)
    gradient_accumulation_steps: int | None = Field(None, ge=1)
    max_length: int | None = Field(None, ge=8)
    packing: bool | None = None
    warmup_ratio: float | None = Field(None, ge=0, le=1)
    beta: float | None = Field(None, gt=0)
    num_generations: int | None = Field(None, ge=2)
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, gt=0)
    rpo_alpha: float | None = Field(None, ge=0)
    precision: contract.Precision | None = None
    gradient_checkpointing: bool | None = None
    attn_implementation: contract.AttnImplementation | None = None
    liger: bool | None = None
    loss_type: contract.LossType | None = None
    num_iterations: int | None = Field(None, ge=1, le=64)
    max_grad_norm: float | None = Field(None, ge=0)
    min_margin: float | None = Field(None, ge=0)

    field_docs: ClassVar[dict[str, str]] = {
        "epochs": "Passes over the training data (fractions allowed; default 1). maxSteps wins if set.",
        "maxSteps": "Stop after this many optimiser steps.",
        "learningRate": "Peak learning rate (default 2e-4).",
        "batchSize": "Per-device batch size (default 8); grpo: completions per step, a multiple of "
        "numGenerations.",
        "gradientAccumulationSteps": "Micro-batches per optimiser step (default 1).",
        "maxLength": "Token limit per example; longer examples are truncated (default 512).",
        "packing": "sft: padding-free batches, examples concatenated in one row (default false).",
        "warmupRatio": "Fraction of steps spent warming the learning rate up (default 0).",
        "beta": "KL coefficient for dpo and grpo (default 0.1).",
        "numGenerations": "Completions sampled per prompt (grpo, synthetic-preferences; default 4).",
        "maxNewTokens": "Generation length limit (grpo, synthetic-preferences, eval; default 16).",
        "temperature": "Sampling temperature for generation (default 1.0).",
        "rpoAlpha": "dpo: weight of the chosen NLL added to the loss (RPO). Unset: 1.0; 0: pure DPO.",
        "precision": "Mixed precision: auto (bf16 on a CUDA GPU that supports it, else fp32), bf16, fp16 "
        "(CUDA only) or fp32.",
        "gradientCheckpointing": "Recompute activations in the backward pass: less memory, ~20% slower.",
        "attnImplementation": "Attention kernel: sdpa, flash_attention_2 (needs flash-attn and a GPU) or "
        "eager. Absent: the model's default.",
        "liger": "Liger Triton kernels for the model's layers (needs liger-kernel and a CUDA GPU).",
        "lossType": "dpo: TRL's DPO loss (sigmoid, ipo, hinge, ...; default sigmoid). grpo: TRL's GRPO loss "
        "(grpo, dapo, dr_grpo, bnpo, ...; default dapo).",
        "maxGradNorm": "Gradient clipping norm (TRL's max_grad_norm; default 1.0); 0 disables clipping.",
        "numIterations": "grpo: policy updates per batch of generations (TRL's num_iterations, PPO-style "
        "clipping when > 1).",
        "minMargin": "synthetic-preferences: keep a best-vs-worst pair only when the teacher's scores "
        "differ by at least this much (default 0: any strict difference).",
    }


class CheckpointPolicy(ApiMixin, contract.CheckpointPolicy):
    """When the trainer writes resumable checkpoints; retries and preemptions resume from the latest."""

    field_docs: ClassVar[dict[str, str]] = {
        "everySteps": "Checkpoint every N optimiser steps.",
        "everySeconds": "Checkpoint at least this often in wall-clock seconds.",
        "keep": "Checkpoints kept; older ones are deleted.",
    }


_CURRICULUM_SCORE = "scoreField: required exactly when orderBy is score"


class Curriculum(ApiMixin, contract.CurriculumSpec):
    """The order in which training examples are presented."""

    model_config = {
        "json_schema_extra": cel(
            rule("(self.orderBy == 'score') == has(self.scoreField)", _CURRICULUM_SCORE, ".scoreField"),
        )
    }
    field_docs: ClassVar[dict[str, str]] = {
        "orderBy": "none (shuffled), length (short first), score (ascending scoreField) or dataset "
        "(the order of data.train).",
        "scoreField": "Numeric record field to sort by when orderBy is score.",
    }
    field_schema: ClassVar[dict[str, dict[str, Any]]] = {"scoreField": {"maxLength": 128}}

    @model_validator(mode="after")
    def _score_field(self) -> Curriculum:
        if (self.order_by == "score") != (self.score_field is not None):
            raise FieldError(_CURRICULUM_SCORE)
        return self


_REPLAY_NEEDS_DATASETS = "datasets: replay with ratio > 0 needs datasets"


class StageReplay(ApiModel):
    """Rehearsal of earlier data mixed into this stage's training data, against forgetting."""

    model_config = {
        "json_schema_extra": cel(
            rule(
                "self.ratio == 0.0 || (has(self.datasets) && size(self.datasets) > 0)",
                _REPLAY_NEEDS_DATASETS,
                ".datasets",
            ),
        )
    }

    ratio: float = doc(
        "Fraction of each batch drawn from the replay datasets, in [0, 1].", default=0.0, ge=0.0, le=1.0
    )
    datasets: list[str] = doc(
        "Names of spec.datasets to replay.", default_factory=list, max_length=MAX_DATASETS
    )
    sampling: Literal["uniform", "per-task-balanced"] = doc(
        "uniform, or per-task-balanced (equal share per dataset task tag).", default="uniform"
    )
    max_examples: int | None = doc("Cap on replayed examples.", default=None, ge=1)
    seed: int = doc("Sampling seed; a retried attempt sees the same mix.", default=0, ge=0)

    field_schema: ClassVar[dict[str, dict[str, Any]]] = {"datasets": {"itemMaxLength": DNS_LABEL_MAX}}

    @model_validator(mode="after")
    def _needs_datasets(self) -> StageReplay:
        if self.ratio > 0 and not self.datasets:
            raise FieldError(_REPLAY_NEEDS_DATASETS)
        return self


class StageData(ApiModel):
    """Which of spec.datasets a stage trains and evaluates on, by name."""

    train: list[str] = doc("Training datasets, by name.", default_factory=list, max_length=MAX_DATASETS)
    eval: list[str] = doc(
        "Held-out datasets for eval loss during training, by name.",
        default_factory=list,
        max_length=MAX_DATASETS,
    )
    curriculum: Curriculum | None = doc("Example ordering; shuffled when absent.", default=None)
    replay: StageReplay | None = doc("Replay mixing; none when absent.", default=None)

    field_schema: ClassVar[dict[str, dict[str, Any]]] = {
        "train": {"itemMaxLength": DNS_LABEL_MAX},
        "eval": {"itemMaxLength": DNS_LABEL_MAX},
    }

    def names(self) -> list[str]:
        return [*self.train, *self.eval, *(self.replay.datasets if self.replay else [])]


_REGEX_PATTERN = "pattern: a regex reward needs pattern"
_LENGTH_TARGET = "targetLength: a length reward needs targetLength"
_REWARD_MODEL_SOURCE = (
    "stage: a reward-model reward names exactly one of stage or adapter; other rewards name neither"
)


class Reward(ApiModel):
    """One reward term for grpo and synthetic-preferences; the total is the weighted sum."""

    model_config = {
        "json_schema_extra": cel(
            rule("self.type != 'regex' || has(self.pattern)", _REGEX_PATTERN, ".pattern"),
            rule("self.type != 'length' || has(self.targetLength)", _LENGTH_TARGET, ".targetLength"),
            rule(
                "self.type == 'reward-model' ? has(self.stage) != has(self.adapter) : !has(self.stage) && "
                "!has(self.adapter)",
                _REWARD_MODEL_SOURCE,
                ".stage",
            ),
        )
    }

    type: Literal["exact-match", "regex", "length", "reward-model"] = doc(
        "exact-match (completion equals the record's answer), regex (completion matches pattern), "
        "length (closeness to targetLength tokens) or reward-model (a trained scorer)."
    )
    weight: float = doc("Weight of this term in the total reward.", default=1.0)
    pattern: str | None = doc("Regular expression for a regex reward.", default=None, max_length=256)
    target_length: int | None = doc(
        "Target completion length in tokens for a length reward.", default=None, ge=1
    )
    stage: str | None = doc(
        "An earlier reward-model stage of this run whose adapter scores completions.",
        default=None,
        max_length=STAGE_NAME_MAX,
    )
    adapter: str | None = doc(
        "An Adapter (in this namespace) trained as a reward model.",
        default=None,
        max_length=DNS_SUBDOMAIN_MAX,
    )

    @model_validator(mode="after")
    def _type_options(self) -> Reward:
        if self.type == "regex" and self.pattern is None:
            raise FieldError(_REGEX_PATTERN)
        if self.type == "length" and self.target_length is None:
            raise FieldError(_LENGTH_TARGET)
        named = (self.stage is not None) + (self.adapter is not None)
        if (self.type == "reward-model" and named != 1) or (self.type != "reward-model" and named):
            raise FieldError(_REWARD_MODEL_SOURCE)
        return self


Metric = contract.Metric


_JUDGE_SOURCE = "stage: a judge names exactly one of stage or adapter"
_JUDGE_ONLY = "judge: a judge suite needs judge (its reward model); other metrics take none"


class SuiteJudge(ApiModel):
    """The reward model a judge suite scores completions with: an earlier stage's or an Adapter."""

    model_config = {
        "json_schema_extra": cel(rule("has(self.stage) != has(self.adapter)", _JUDGE_SOURCE, ".stage"))
    }

    stage: str | None = doc(
        "An earlier reward-model stage of this run.", default=None, max_length=STAGE_NAME_MAX
    )
    adapter: str | None = doc(
        "A Ready Adapter in this namespace, published by a reward-model stage.",
        default=None,
        max_length=DNS_SUBDOMAIN_MAX,
    )

    @model_validator(mode="after")
    def _one_source(self) -> SuiteJudge:
        if (self.stage is None) == (self.adapter is None):
            raise FieldError(_JUDGE_SOURCE)
        return self


class EvalSuite(ApiModel):
    """A named evaluation: one metric on one dataset, optionally a regression gate."""

    model_config = {
        "json_schema_extra": cel(rule("(self.metric == 'judge') == has(self.judge)", _JUDGE_ONLY, ".judge"))
    }

    name: str = doc(
        "Suite name; results are reported as suite/<name>/<metric>.",
        max_length=DNS_LABEL_MAX,
        pattern=DNS_LABEL,
    )
    dataset: str = doc("Name of the spec.datasets entry to evaluate on.", max_length=DNS_LABEL_MAX)
    metric: Metric = doc(
        "exact_match, loss, perplexity, preference_accuracy (preference datasets), distinct_n or self_bleu "
        "(diversity; self_bleu near 1 is mode collapse), kl_to_reference (mean per-token KL to the "
        "baseline model on the dataset's completions: drift), safety (pass rate on records labelled "
        "expected: refuse|comply), robustness (exact_match under seeded prompt perturbations) or judge "
        "(the mean score judge's reward model gives the greedy completions; also reported: "
        "suite/<name>/judge_win_rate, the share of prompts it scores above the baseline's completion)."
    )
    judge: SuiteJudge | None = doc(
        "The reward model of a judge suite (required for metric judge, forbidden otherwise).", default=None
    )
    max_regression: float | None = doc(
        "Largest tolerated relative drop against the baseline, measured in the same eval stage: the "
        "evaluated adapter's parent, else the base model (an eval of the base model itself has none). "
        "0.01 = 1%. A larger drop fails the stage (reason RegressionGateFailed); in a continual cycle it "
        "is also a promotion gate against the promoted adapter, which blocks promotion instead. "
        "Absent: report only.",
        default=None,
        ge=0,
    )

    @model_validator(mode="after")
    def _judge_only_for_judge(self) -> EvalSuite:
        if (self.metric == "judge") != (self.judge is not None):
            raise FieldError(_JUDGE_ONLY)
        return self


_MERGE_SOURCE = "stage: a merge source names exactly one of stage or adapter"


class StageMergeSource(ApiModel):
    """One adapter going into a merge: an earlier stage's output or an existing Adapter."""

    model_config = {
        "json_schema_extra": cel(rule("has(self.stage) != has(self.adapter)", _MERGE_SOURCE, ".stage"))
    }

    stage: str | None = doc("An earlier stage of this run.", default=None, max_length=STAGE_NAME_MAX)
    adapter: str | None = doc("An Adapter in this namespace.", default=None, max_length=DNS_SUBDOMAIN_MAX)
    weight: float = doc("Relative weight of this source.", default=1.0, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> StageMergeSource:
        if (self.stage is None) == (self.adapter is None):
            raise FieldError(_MERGE_SOURCE)
        return self


_DENSITY = "density: only ties and dare_ties take density"


class StageMerge(ApiMixin, contract.MergeSpec):
    """Merge adapters into one (PEFT's add_weighted_adapter)."""

    model_config = {
        "json_schema_extra": cel(
            rule("!has(self.density) || self.method in ['ties', 'dare_ties']", _DENSITY, ".density")
        )
    }

    sources: list[StageMergeSource] = doc("Adapters to merge: at least two.", min_length=2, max_length=16)

    field_docs: ClassVar[dict[str, str]] = {
        "method": "linear, ties, dare_ties or cat (concatenate ranks).",
        "density": "Fraction of weights kept by ties and dare_ties, in (0, 1].",
    }

    @model_validator(mode="after")
    def _density(self) -> StageMerge:
        if self.density is not None and self.method not in ("ties", "dare_ties"):
            raise FieldError(_DENSITY)
        return self


class Toleration(ApiModel):
    """A Kubernetes toleration for the trainer pods."""

    key: str | None = doc(
        "Taint key; empty with operator Exists matches every taint.", default=None, max_length=316
    )
    operator: Literal["Exists", "Equal"] | None = doc("Exists or Equal (default Equal).", default=None)
    value: str | None = doc("Taint value for Equal.", default=None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = doc(
        "Taint effect to tolerate; empty tolerates all.", default=None
    )
    toleration_seconds: int | None = doc("How long a NoExecute taint is tolerated.", default=None)


_FSDP_NEEDS_GPUS = "strategy: fsdp shards the model over GPUs; set gpus, or use ddp or auto on CPU"


class StageResources(ApiModel):
    """Compute for one stage; Kueue admits the stage's Job against the run's queue with these."""

    model_config = {
        "json_schema_extra": cel(
            rule(
                "!has(self.strategy) || self.strategy != 'fsdp' || (has(self.gpus) && self.gpus > 0)",
                _FSDP_NEEDS_GPUS,
                ".strategy",
            )
        )
    }

    gpus: int = doc("GPUs per node (nvidia.com/gpu). 0 trains on CPU.", default=0, ge=0, le=16)
    nodes: int = doc("Nodes (pods) for distributed training.", default=1, ge=1, le=64)
    strategy: contract.Strategy = doc(
        "How the processes (one per GPU, one per CPU pod) share the model: ddp replicates it, fsdp shards "
        "it (GPUs only). auto picks ddp for adapters and fsdp for full fine-tunes or a model that does not "
        "fit one device.",
        default="auto",
    )
    cpu: Quantity | None = doc("CPU request and limit per pod, e.g. 4 or 500m.", default=None)
    memory: Quantity | None = doc("Memory request and limit per pod, e.g. 64Gi.", default=None)
    node_selector: dict[str, str] = doc("Node labels the pods must match.", default_factory=dict)
    tolerations: list[Toleration] = doc("Tolerations for the pods.", default_factory=list, max_length=16)
    affinity: dict[str, Any] | None = doc(
        "A Kubernetes Affinity (core/v1), passed to the pods unchanged.", default=None
    )

    field_schema: ClassVar[dict[str, dict[str, Any]]] = {
        "cpu": _QUANTITY_SCHEMA,
        "memory": _QUANTITY_SCHEMA,
        "nodeSelector": {"maxItems": 16, "itemMaxLength": 63},
        "affinity": {"x-kubernetes-preserve-unknown-fields": True},
    }

    @model_validator(mode="after")
    def _quantities(self) -> StageResources:
        import re

        for name in ("cpu", "memory"):
            value = getattr(self, name)
            if isinstance(value, str) and not re.fullmatch(QUANTITY_PATTERN, value):
                raise FieldError(f"{name}: {value!r} is not a Kubernetes quantity")
        if self.strategy == "fsdp" and not self.gpus:
            raise FieldError(_FSDP_NEEDS_GPUS)
        return self


class Retries(ApiModel):
    """How failed attempts are retried. Non-retryable trainer failures (bad input) never are."""

    max_retries: int = doc("Retries after the first attempt.", default=2, ge=0, le=20)
    backoff_seconds: int = doc("Delay before the first retry; doubles per retry.", default=30, ge=0, le=86400)


# -- stages ------------------------------------------------------------------------------------

StageType = contract.StageType

_TRAINING_HYPERPARAMETERS = (
    "epochs",
    "maxSteps",
    "learningRate",
    "batchSize",
    "gradientAccumulationSteps",
    "maxLength",
    "warmupRatio",
    "precision",
    "gradientCheckpointing",
    "attnImplementation",
    "liger",
    "maxGradNorm",
)
# The one table of which hyperparameters each stage type reads: anything else is rejected (CEL + pydantic).
STAGE_HYPERPARAMETERS: dict[str, tuple[str, ...]] = {
    "sft": (*_TRAINING_HYPERPARAMETERS, "packing", "maxNewTokens"),
    "dpo": (*_TRAINING_HYPERPARAMETERS, "beta", "rpoAlpha", "lossType", "maxNewTokens"),
    "grpo": (
        *_TRAINING_HYPERPARAMETERS,
        "beta",
        "lossType",
        "numIterations",
        "numGenerations",
        "maxNewTokens",
        "temperature",
    ),
    "reward-model": _TRAINING_HYPERPARAMETERS,
    "synthetic-preferences": (  # sampling and scoring, then the dpo stage's training
        *_TRAINING_HYPERPARAMETERS,
        "beta",
        "rpoAlpha",
        "lossType",
        "minMargin",
        "numGenerations",
        "maxNewTokens",
        "temperature",
    ),
    "eval": ("maxNewTokens", "attnImplementation"),
    "merge": (),
}
STAGE_LOSS_TYPES: dict[str, tuple[str, ...]] = {
    "dpo": contract.DPO_LOSS_TYPES,
    "synthetic-preferences": contract.DPO_LOSS_TYPES,
    "grpo": contract.GRPO_LOSS_TYPES,
}


def _stage_types_using(field: str) -> tuple[str, ...]:
    return tuple(t for t, fields in STAGE_HYPERPARAMETERS.items() if field in fields)


def _hyperparameter_message(field: str, stage_type: str) -> str:
    """The same words from pydantic and from the apiserver (a CEL messageExpression)."""
    users = ", ".join(_stage_types_using(field))
    return f"hyperparameters.{field}: not used by {stage_type} stages (only {users} stages use it)"


_LOSS_TYPE_MESSAGE = (
    "hyperparameters.lossType: dpo takes "
    + ", ".join(contract.DPO_LOSS_TYPES)
    + "; grpo takes "
    + ", ".join(contract.GRPO_LOSS_TYPES)
)


def _hyperparameter_rules() -> list[dict[str, str]]:
    """One CEL rule per hyperparameter that some stage type ignores, from STAGE_HYPERPARAMETERS."""
    rules = []
    for field in Hyperparameters.model_json_schema(by_alias=True)["properties"]:
        users = _stage_types_using(field)
        if len(users) == len(STAGE_HYPERPARAMETERS):
            continue
        expr = (
            f"!has(self.hyperparameters) || !has(self.hyperparameters.{field}) || "
            f"self.type in {_cel_list(users)}"
        )
        check = rule(expr, _hyperparameter_message(field, "these"), f".hyperparameters.{field}")
        head, tail = _hyperparameter_message(field, "\x00").split("\x00")
        check["messageExpression"] = f"'{head}' + self.type + '{tail}'"
        rules.append(check)
    loss_ok = " || ".join(
        f"(self.type == '{t}' && self.hyperparameters.lossType in {_cel_list(types)})"
        for t, types in STAGE_LOSS_TYPES.items()
    )
    rules.append(
        rule(
            f"!has(self.hyperparameters) || !has(self.hyperparameters.lossType) || {loss_ok}",
            _LOSS_TYPE_MESSAGE,
            ".hyperparameters.lossType",
        )
    )
    return rules


_NEEDS_TRAIN = (
    "data.train: sft, dpo, grpo, reward-model and synthetic-preferences stages need training datasets"
)
_SUITES_ONLY_EVAL = "suites: eval stages need suites; other stages take none"
_REWARDS_ONLY_RL = "rewards: grpo and synthetic-preferences stages need rewards; other stages take none"
_MERGE_ONLY_MERGE = "merge: merge stages need merge; other stages take none"


class Stage(ApiModel):
    """One step of the pipeline, run as one Kubernetes Job; stages run in the listed order."""

    model_config = {
        "json_schema_extra": cel(
            rule(
                f"!(self.type in {_cel_list(TRAINING_TYPES)}) || (has(self.data) && has(self.data.train) && "
                f"size(self.data.train) > 0)",
                _NEEDS_TRAIN,
                ".data",
            ),
            rule(
                "(self.type == 'eval') == (has(self.suites) && size(self.suites) > 0)",
                _SUITES_ONLY_EVAL,
                ".suites",
            ),
            rule(
                f"(self.type in {_cel_list(REWARDED_TYPES)}) == (has(self.rewards) && size(self.rewards) > "
                f"0)",
                _REWARDS_ONLY_RL,
                ".rewards",
            ),
            rule("(self.type == 'merge') == has(self.merge)", _MERGE_ONLY_MERGE, ".merge"),
            *_hyperparameter_rules(),
        )
    }

    name: str = doc(
        "Unique stage name (a DNS label, at most 32 characters); used in Job and Adapter names.",
        max_length=STAGE_NAME_MAX,
        pattern=DNS_LABEL,
    )
    type: StageType = doc(
        "sft, dpo, grpo, reward-model (a scorer for reward-model rewards), synthetic-preferences (sample "
        "completions, a teacher (its rewards: a reward-model Adapter and/or built-in functions) scores them, "
        "DPO on best-vs-worst pairs at least minMargin apart; the pairs are kept beside the adapter), "
        "eval (suites against the from stage's adapter, or the base model; results go to that Adapter's "
        "status.evals) or merge. Every stage but eval publishes an Adapter."
    )
    from_: str | None = Field(
        None,
        alias="from",
        max_length=STAGE_NAME_MAX,
        description="An earlier stage whose adapter this stage starts from (or evaluates). Absent: the base "
        "model.",
    )
    peft: Peft | None = doc("Adapter method and shape; LoRA r=8 when absent.", default=None)
    data: StageData | None = doc("Datasets by name, curriculum and replay.", default=None)
    hyperparameters: Hyperparameters | None = doc(
        "Optimisation settings; defaults when absent.", default=None
    )
    resources: StageResources | None = doc("Compute; one CPU pod when absent.", default=None)
    retries: Retries | None = doc("Retry policy; 2 retries when absent.", default=None)
    active_deadline_seconds: int | None = doc(
        "Wall-clock limit per attempt; the attempt fails when it is exceeded.", default=None, ge=1
    )
    checkpoint: CheckpointPolicy | None = doc("Checkpoint policy; defaults when absent.", default=None)
    rewards: list[Reward] = doc(
        "Reward terms (grpo, synthetic-preferences).", default_factory=list, max_length=8
    )
    suites: list[EvalSuite] = doc(
        "Evaluation suites (eval stages).",
        default_factory=list,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    merge: StageMerge | None = doc("Merge settings (merge stages).", default=None)
    seed: int = doc("Seed for shuffling, sampling and initialisation.", default=42, ge=0)

    @model_validator(mode="after")
    def _type_fields(self) -> Stage:
        if self.type in TRAINING_TYPES and not (self.data and self.data.train):
            raise FieldError(_NEEDS_TRAIN)
        if (self.type == "eval") != bool(self.suites):
            raise FieldError(_SUITES_ONLY_EVAL)
        if (self.type in REWARDED_TYPES) != bool(self.rewards):
            raise FieldError(_REWARDS_ONLY_RL)
        if (self.type == "merge") != (self.merge is not None):
            raise FieldError(_MERGE_ONLY_MERGE)
        unique_names(self.suites, "suites")
        self._hyperparameters_used()
        return self

    def _hyperparameters_used(self) -> None:
        if self.hyperparameters is None:
            return
        hp = self.hyperparameters
        allowed = STAGE_HYPERPARAMETERS[self.type]
        for name in sorted(hp.model_fields_set):
            alias = type(hp).model_fields[name].alias or name
            if alias not in allowed:
                raise FieldError(_hyperparameter_message(alias, self.type))
        if hp.loss_type is not None and hp.loss_type not in STAGE_LOSS_TYPES.get(self.type, ()):
            raise FieldError(f"{_LOSS_TYPE_MESSAGE} (this stage is {self.type})")


# -- continual learning ------------------------------------------------------------------------

_NEW_DATA_ONE_OF = "uriTemplate: set exactly one of uriTemplate or prefix"


class NewData(ApiModel):
    """Where each cycle's new data comes from; it replaces the named dataset's uri for that cycle."""

    model_config = {
        "json_schema_extra": cel(
            rule("has(self.uriTemplate) != has(self.prefix)", _NEW_DATA_ONE_OF, ".uriTemplate")
        )
    }

    dataset: str = doc("The spec.datasets entry whose uri each cycle replaces.", max_length=DNS_LABEL_MAX)
    uri_template: str | None = doc(
        "Python format string rendered per cycle with cycle_date (the scheduled time in timeZone), "
        "cycle (1, 2, ...) and run, e.g. s3://data/tickets/{cycle_date:%Y-%m}.jsonl.",
        default=None,
        max_length=1024,
    )
    prefix: str | None = doc(
        "s3:// prefix: each cycle takes every data object (.jsonl, .json, .parquet) not consumed by an "
        "earlier cycle.",
        default=None,
        max_length=1024,
        pattern=S3_URI,
    )

    @model_validator(mode="after")
    def _one_of(self) -> NewData:
        if (self.uri_template is None) == (self.prefix is None):
            raise FieldError(_NEW_DATA_ONE_OF)
        return self


class ReplayBuffer(ApiModel):
    """The replay buffer: an index of earlier cycles' datasets, kept in object storage."""

    uri: str = doc("s3:// prefix holding the buffer index (buffer.json).", max_length=1024, pattern=S3_URI)
    max_examples: int | None = doc(
        "Examples kept; the oldest segments are evicted first.", default=None, ge=1
    )
    sampling: Literal["uniform", "per-task-balanced"] = doc(
        "Eviction and sampling: uniform (oldest first) or per-task-balanced (the largest task gives way "
        "first).",
        default="uniform",
    )


_BUFFER_NEEDED = "buffer: replay with ratio > 0 needs buffer"


class ContinualReplay(ApiModel):
    """Replay of earlier cycles' data into each new cycle's training stages."""

    model_config = {
        "json_schema_extra": cel(rule("self.ratio == 0.0 || has(self.buffer)", _BUFFER_NEEDED, ".buffer"))
    }

    ratio: float = doc(
        "Fraction of training examples drawn from the buffer, in [0, 1).", default=0.0, ge=0.0, lt=1.0
    )
    buffer: ReplayBuffer | None = doc("The buffer; required when ratio > 0.", default=None)

    @model_validator(mode="after")
    def _buffer(self) -> ContinualReplay:
        if self.ratio > 0 and self.buffer is None:
            raise FieldError(_BUFFER_NEEDED)
        return self


class Gate(ApiModel):
    """A promotion gate: a suite of an eval stage must not regress beyond maxRegression."""

    suite: str = doc("Name of a suite of an eval stage in spec.stages.", max_length=DNS_LABEL_MAX)
    metric: Metric = doc("The suite's metric to compare.")
    max_regression: float = doc(
        "Largest tolerated relative drop against the promoted adapter: 0.01 = 1%.", default=0.0, ge=0
    )


class Promote(ApiModel):
    """Promotion of a cycle's final adapter to an alias (see status.aliases)."""

    alias: str = doc("Alias name, e.g. stable.", max_length=DNS_LABEL_MAX, pattern=DNS_LABEL)
    require_gates: bool = doc("Promote only when every gate passed.", default=True)


CRON = r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|\S+( +\S+){4})$"


class Continual(ApiModel):
    """Makes the run recurring, like a CronJob: each cycle runs every stage on that cycle's new data."""

    schedule: str = doc(
        "Cron schedule (5 fields or @daily-style macros), in timeZone.", max_length=128, pattern=CRON
    )
    time_zone: str = doc("IANA time zone of the schedule.", default="UTC", max_length=64)
    concurrency_policy: Literal["Allow", "Forbid", "Replace"] = doc(
        "When a cycle is due while one runs: Allow (both run), Forbid (wait) or Replace (stop the running "
        "one).",
        default="Forbid",
    )
    starting_deadline_seconds: int | None = doc(
        "A cycle more than this late is skipped (recorded as missed).", default=None, ge=0
    )
    new_data: NewData | None = doc("Each cycle's new data.", default=None)
    replay: ContinualReplay | None = doc("Replay of earlier cycles' data.", default=None)
    gates: list[Gate] = doc("Promotion gates.", default_factory=list, max_length=16)
    promote: Promote | None = doc("Alias promotion of each cycle's final adapter.", default=None)
    history_limit: int = doc("Cycles kept in status.cycles (and their Jobs).", default=10, ge=1, le=100)


# -- trainer -----------------------------------------------------------------------------------


class EnvVar(ApiModel):
    """An extra environment variable for trainer pods (never use it for secrets' values)."""

    name: str = doc("Variable name.", max_length=128, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    value: str = doc("Value.", default="", max_length=4096)


class ContainerResources(ApiModel):
    """Raw container resources, merged over what the stage's resources imply."""

    requests: dict[str, Quantity] = doc("Resource requests.", default_factory=dict)
    limits: dict[str, Quantity] = doc("Resource limits.", default_factory=dict)

    field_schema: ClassVar[dict[str, dict[str, Any]]] = {
        "requests": {"maxItems": 16, "additionalProperties": _QUANTITY_SCHEMA},
        "limits": {"maxItems": 16, "additionalProperties": _QUANTITY_SCHEMA},
    }


class Trainer(ApiModel):
    """The trainer container."""

    image: str | None = doc(
        "Trainer image; the operator's configured default when absent.", default=None, max_length=512
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = doc(
        "Image pull policy; Kubernetes' default when absent.", default=None
    )
    resources: ContainerResources | None = doc("Container resource overrides.", default=None)
    env: list[EnvVar] = doc(
        "Extra environment variables.",
        default_factory=list,
        max_length=32,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    model_cache: ModelCache | None = doc(
        "The model-cache volume for this run's pods; the operator's default (chart value "
        "trainer.modelCache) when absent.",
        default=None,
    )

    @model_validator(mode="after")
    def _unique_env(self) -> Trainer:
        unique_names(self.env, "env")
        return self


class StorageSpec(S3Options):
    """Where every artifact of the run goes: adapters, checkpoints, progress, manifests."""

    uri: str = doc("s3://bucket/prefix/ owned by this run.", max_length=1024, pattern=S3_URI)

    def to_config(self) -> contract.StorageConfig:
        """The contract's storage settings (no URI, no credentials)."""
        return contract.StorageConfig(
            endpoint_url=self.endpoint_url, region=self.region, addressing_style=self.addressing_style
        )


# -- the spec ----------------------------------------------------------------------------------

_FROM_EARLIER = "from: must name an earlier stage"
_REWARD_STAGE = "rewards[].stage: must name an earlier reward-model stage"
_MERGE_STAGE = "merge.sources[].stage: must name an earlier stage"
_JUDGE_STAGE = "suites[].judge.stage: must name an earlier reward-model stage"
_STAGE_NAMES_UNIQUE = "name: stage names must be unique"
_DATASET_NAMES_UNIQUE = "name: dataset names must be unique"
_DATA_DECLARED = "data: every dataset a stage names must be declared in spec.datasets"
_SUITE_DATASET = "suites[].dataset: must name a dataset in spec.datasets"
_PREFERENCE = "data.train: dpo and reward-model stages train on preference-format datasets"
_NEW_DATA_DATASET = "continual.newData.dataset: must name a dataset in spec.datasets"
_GATE_SUITE = "continual.gates[].suite: must name a suite of an eval stage"


def _declared(expr: str) -> str:
    return f"has(self.datasets) && self.datasets.exists(d, d.name == {expr})"


def _earlier(name_expr: str, extra: str = "") -> str:
    # Two-variable comprehension (Kubernetes >= 1.33): stage `p` at index j precedes `s` at index i.
    return f"self.exists(j, p, j < i && p.name == {name_expr}{extra})"


class PostTrainingRunSpec(ApiModel):
    """Desired state of a PostTrainingRun."""

    model_config = {
        "json_schema_extra": cel(
            rule(
                "self.stages.all(s, !has(s.data) || ((!has(s.data.train) || s.data.train.all(n, "
                + _declared("n")
                + ")) && (!has(s.data.eval) || s.data.eval.all(n, "
                + _declared("n")
                + ")) && (!has(s.data.replay) || !has(s.data.replay.datasets) || "
                + "s.data.replay.datasets.all(n, "
                + _declared("n")
                + "))))",
                _DATA_DECLARED,
                ".stages",
            ),
            rule(
                "self.stages.all(s, !has(s.suites) || s.suites.all(x, " + _declared("x.dataset") + "))",
                _SUITE_DATASET,
                ".stages",
            ),
            rule(
                f"self.stages.all(s, !(s.type in {_cel_list(PREFERENCE_TYPES)}) || !has(s.data) || "
                f"!has(s.data.train) || "
                "s.data.train.all(n, has(self.datasets) && self.datasets.exists(d, d.name == n && d.format "
                "== 'preference')))",
                _PREFERENCE,
                ".stages",
            ),
            rule(
                "!has(self.continual) || !has(self.continual.newData) || "
                + _declared("self.continual.newData.dataset"),
                _NEW_DATA_DATASET,
                ".continual.newData.dataset",
            ),
            rule(
                "!has(self.continual) || !has(self.continual.gates) || self.continual.gates.all(g, "
                "self.stages.exists(s, "
                "s.type == 'eval' && has(s.suites) && s.suites.exists(x, x.name == g.suite)))",
                _GATE_SUITE,
                ".continual.gates",
            ),
        )
    }

    base_model: ModelSource = doc(
        "The frozen base model every stage builds on. Immutable.",
        json_schema_extra=immutable("spec.baseModel"),
    )
    storage: StorageSpec = doc(
        "Object storage for every artifact of the run. Immutable.",
        json_schema_extra=immutable("spec.storage"),
    )
    datasets: list[Dataset] = doc(
        "Datasets the stages refer to by name. May change between continual cycles.",
        default_factory=list,
        max_length=MAX_DATASETS,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
            **cel(rule("self.all(d, self.exists_one(e, e.name == d.name))", _DATASET_NAMES_UNIQUE)),
        },
    )
    trainer: Trainer | None = doc("Trainer container settings.", default=None)
    queue_name: str | None = doc(
        "Kueue LocalQueue to submit the stage Jobs to (kueue.x-k8s.io/queue-name).",
        default=None,
        max_length=DNS_SUBDOMAIN_MAX,
        pattern=DNS_SUBDOMAIN,
    )
    priority_class_name: str | None = doc(
        "PriorityClass of the trainer pods.",
        default=None,
        max_length=DNS_SUBDOMAIN_MAX,
        pattern=DNS_SUBDOMAIN,
    )
    suspend: bool = doc(
        "Stops the running stage (its Job is suspended; with queueName it is deleted, so Kueue releases the "
        "quota) and keeps new cycles from starting. Resuming continues the same attempt from the latest "
        "checkpoint (with queueName: queued again).",
        default=False,
    )
    stages: list[Stage] = doc(
        "The pipeline, run in order. Immutable: a changed pipeline is a new run.",
        min_length=1,
        max_length=MAX_STAGES,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
            **cel(
                rule("self.all(s, self.exists_one(t, t.name == s.name))", _STAGE_NAMES_UNIQUE),
                rule(f"self.all(i, s, !has(s.from) || {_earlier('s.from')})", _FROM_EARLIER),
                rule(
                    "self.all(i, s, !has(s.rewards) || s.rewards.all(r, !has(r.stage) || "
                    + _earlier("r.stage", " && p.type == 'reward-model'")
                    + "))",
                    _REWARD_STAGE,
                ),
                rule(
                    "self.all(i, s, !has(s.suites) || s.suites.all(x, !has(x.judge) || "
                    + "!has(x.judge.stage) || "
                    + _earlier("x.judge.stage", " && p.type == 'reward-model'")
                    + "))",
                    _JUDGE_STAGE,
                ),
                rule(
                    "self.all(i, s, !has(s.merge) || s.merge.sources.all(m, !has(m.stage) || "
                    + _earlier("m.stage")
                    + "))",
                    _MERGE_STAGE,
                ),
                rule("self == oldSelf", "spec.stages is immutable"),
            ),
        },
    )
    continual: Continual | None = doc("Makes the run recurring.", default=None)

    @model_validator(mode="after")
    def _cross_references(self) -> PostTrainingRunSpec:
        unique_names(self.datasets, "datasets")
        unique_names(self.stages, "stages")
        formats = {d.name: d.format for d in self.datasets}
        position = {s.name: i for i, s in enumerate(self.stages)}
        for i, stage in enumerate(self.stages):
            where = f"stages[{i}]"
            if stage.from_ is not None and position.get(stage.from_, i) >= i:
                raise FieldError(f"{where}.{_FROM_EARLIER} (got {stage.from_!r})")
            for name in stage.data.names() if stage.data else []:
                if name not in formats:
                    raise FieldError(f"{where}.{_DATA_DECLARED} (missing {name!r})")
            for j, suite in enumerate(stage.suites):
                if suite.dataset not in formats:
                    raise FieldError(
                        f"{where}.suites[{j}].dataset: must name a dataset in spec.datasets (got "
                        f"{suite.dataset!r})"
                    )
                ref = suite.judge.stage if suite.judge else None
                if ref is not None and not (
                    position.get(ref, i) < i and self.stages[position[ref]].type == "reward-model"
                ):
                    raise FieldError(
                        f"{where}.suites[{j}].judge.stage: must name an earlier reward-model stage "
                        f"(got {ref!r})"
                    )
            if stage.type in PREFERENCE_TYPES and stage.data:
                for name in stage.data.train:
                    if formats[name] != "preference":
                        raise FieldError(f"{where}.{_PREFERENCE} ({name!r} is {formats[name]})")
            for j, reward in enumerate(stage.rewards):
                ref = reward.stage
                if ref is not None and not (
                    position.get(ref, i) < i and self.stages[position[ref]].type == "reward-model"
                ):
                    raise FieldError(
                        f"{where}.rewards[{j}].stage: must name an earlier reward-model stage (got {ref!r})"
                    )
            for j, source in enumerate(stage.merge.sources if stage.merge else []):
                if source.stage is not None and position.get(source.stage, i) >= i:
                    raise FieldError(
                        f"{where}.merge.sources[{j}].stage: must name an earlier stage (got {source.stage!r})"
                    )
        if self.continual:
            new_data = self.continual.new_data
            if new_data is not None and new_data.dataset not in formats:
                raise FieldError(f"{_NEW_DATA_DATASET} (got {new_data.dataset!r})")
            suites = {x.name for s in self.stages if s.type == "eval" for x in s.suites}
            for j, gate in enumerate(self.continual.gates):
                if gate.suite not in suites:
                    raise FieldError(
                        f"continual.gates[{j}].suite: must name a suite of an eval stage (got {gate.suite!r})"
                    )
        return self

    def dataset(self, name: str) -> contract.DatasetSpec:
        """The contract's form of a dataset named by a stage."""
        found = next(d for d in self.datasets if d.name == name)
        return contract.DatasetSpec(name=found.name, uri=found.uri, format=found.format, task=found.task)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


# -- status ------------------------------------------------------------------------------------

StageState = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended", "Skipped"]
RunPhase = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended", "Waiting"]


class StageTopology(ApiModel):
    """The processes a stage attempt ran: one per GPU (one per CPU pod) on each node."""

    world_size: int = doc("Training processes in all.", default=1, ge=1)
    nodes: int = doc("Nodes (pods).", default=1, ge=1)
    procs_per_node: int = doc("Processes per node.", default=1, ge=1)
    gpus_per_node: int = doc("GPUs per node (0 on CPU).", default=0, ge=0)
    strategy: Literal["single", "ddp", "fsdp"] = doc("single, ddp or fsdp.", default="single")


class StageDrift(ApiModel):
    """How far a stage's output moved: mean per-token KL on the trainer's probe set."""

    kl_to_parent: float | None = doc("KL to the stage's parent (drift/kl_to_parent).", default=None)
    kl_to_base: float | None = doc("KL to the base model (drift/kl_to_base).", default=None)
    suites: dict[str, float] = doc("Eval suites' kl_to_reference, by suite name.", default_factory=dict)

    field_schema: ClassVar[dict[str, dict[str, Any]]] = {"suites": {"maxItems": 64}}


class StageStatus(ApiModel):
    """Observed state of one stage (of the current cycle)."""

    name: str = doc("Stage name.", max_length=STAGE_NAME_MAX)
    state: StageState = doc("Pending, Running, Succeeded, Failed, Suspended or Skipped.", default="Pending")
    job: str | None = doc("The stage's current Job.", default=None, max_length=DNS_SUBDOMAIN_MAX)
    attempts: int = doc("Attempts started so far.", default=0, ge=0)
    start_time: str | None = doc("When the first attempt started (RFC 3339).", default=None)
    completion_time: str | None = doc("When the stage finished (RFC 3339).", default=None)
    adapter: str | None = doc(
        "The Adapter holding the stage's output.", default=None, max_length=DNS_SUBDOMAIN_MAX
    )
    manifest_uri: str | None = doc("The output's manifest.json.", default=None)
    metrics: dict[str, float] = doc(
        "Final metrics reported by the trainer, e.g. train_loss.", default_factory=dict
    )
    message: str | None = doc(
        "Why the stage is in its state (never credentials).", default=None, max_length=4096
    )
    topology: StageTopology | None = doc("What the latest finished attempt ran on.", default=None)
    drift: StageDrift | None = doc("Drift of the stage's output, from its metrics.", default=None)


class Progress(ApiModel):
    """Live progress of the running stage, refreshed from the trainer's progress.json."""

    stage: str | None = doc("The running stage.", default=None, max_length=STAGE_NAME_MAX)
    percent: float = doc("Progress of the whole run, 0-100.", default=0.0, ge=0, le=100)
    step: int = doc("Optimiser step of the running stage.", default=0, ge=0)
    total_steps: int = doc("Steps the running stage will take.", default=0, ge=0)
    loss: float | None = doc("Latest training loss.", default=None)
    eta_seconds: float | None = doc("Estimated seconds until the running stage ends.", default=None, ge=0)
    updated_at: str | None = doc("When the trainer last reported (RFC 3339).", default=None)


class GateStatus(ApiModel):
    """One gate's verdict in one cycle."""

    suite: str = doc("Suite name.", max_length=DNS_LABEL_MAX)
    metric: str = doc("Metric.", max_length=64)
    outcome: Literal["Passed", "Failed", "NoBaseline", "Missing"] = doc("The verdict.")
    baseline: float | None = doc("The promoted adapter's value.", default=None)
    current: float | None = doc("This cycle's value.", default=None)
    forgetting: float | None = doc("Relative drop, positive is worse.", default=None)


class CycleStatus(ApiModel):
    """One cycle of a continual run (a one-shot run has exactly one, cycle 1)."""

    cycle: int = doc("Cycle number, from 1.", ge=1)
    scheduled_time: str | None = doc("When the cycle was due (RFC 3339).", default=None)
    start_time: str | None = doc("When it started.", default=None)
    completion_time: str | None = doc("When it ended.", default=None)
    state: Literal["Running", "Succeeded", "Failed", "Missed", "Replaced"] = doc(
        "Outcome so far.", default="Running"
    )
    adapter: str | None = doc("The cycle's final Adapter.", default=None, max_length=DNS_SUBDOMAIN_MAX)
    data_versions: list[str] = doc("New data consumed, as uri@etag.", default_factory=list, max_length=1000)
    gates: Literal["Passed", "Failed", "Skipped"] | None = doc("Overall gate verdict.", default=None)
    gate_results: list[GateStatus] = doc("Per-gate verdicts.", default_factory=list, max_length=16)
    promoted: bool = doc("Whether the cycle's adapter was promoted.", default=False)
    drift: StageDrift | None = doc("Drift of the cycle's adapter (its stage's drift).", default=None)
    message: str | None = doc("Detail (never credentials).", default=None, max_length=4096)


class AliasStatus(ApiModel):
    """Where an alias points: the single source of truth for promotion (see docs/api.md)."""

    name: str = doc("Alias name.", max_length=DNS_LABEL_MAX)
    adapter: str = doc("The Adapter it points to.", max_length=DNS_SUBDOMAIN_MAX)
    cycle: int | None = doc("The cycle that promoted it.", default=None, ge=1)
    promoted_at: str | None = doc("When (RFC 3339).", default=None)


class PostTrainingRunStatus(ApiModel):
    """Observed state of a PostTrainingRun. Written only by the operator."""

    observed_generation: int | None = doc("metadata.generation the status reflects.", default=None, ge=0)
    phase: RunPhase | None = doc(
        "Summary for humans: Pending, Running, Succeeded, Failed, Suspended, or Waiting (continual, between "
        "cycles).",
        default=None,
    )
    conditions: list[Condition] = conditions_field()
    stages: list[StageStatus] = doc(
        "Per-stage state of the current cycle.",
        default_factory=list,
        max_length=MAX_STAGES,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    progress: Progress | None = doc("Live progress.", default=None)
    cycles: list[CycleStatus] = doc(
        "Cycle history, newest last, at most continual.historyLimit.", default_factory=list, max_length=100
    )
    current_cycle: int | None = doc("The cycle in progress.", default=None, ge=1)
    aliases: list[AliasStatus] = doc(
        "Aliases promoted by this run and the Adapter each points to.",
        default_factory=list,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    last_schedule_time: str | None = doc("When the latest cycle was due.", default=None)
    next_schedule_time: str | None = doc("When the next cycle is due (continual).", default=None)
    watermark: dict[str, Any] | None = doc(
        "Bookkeeping of continual.newData.prefix: what earlier cycles consumed.", default=None
    )

    field_schema: ClassVar[dict[str, dict[str, Any]]] = {
        "watermark": {"x-kubernetes-preserve-unknown-fields": True},
        "cycles": {"maxItems": 100},
    }


class PostTrainingRun(ApiModel):
    """A post-training pipeline: SFT, preference tuning, RL, evaluation and merging as ordered stages."""

    api_version: Literal["temper.dev/v1alpha1"] = doc("temper.dev/v1alpha1", default="temper.dev/v1alpha1")
    kind: Literal["PostTrainingRun"] = doc("PostTrainingRun", default="PostTrainingRun")
    metadata: dict[str, Any] = doc("Standard object metadata.", default_factory=dict)
    spec: PostTrainingRunSpec
    status: PostTrainingRunStatus | None = None
