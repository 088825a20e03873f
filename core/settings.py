"""The typed settings of one distillation run.

One pydantic model, shared by the CLI (`amid distill run.yaml`), the API's request body and the
worker, so a field name and its error message mean the same thing everywhere. Torch-free: the
API validates a job without the training stack. Defaults follow the recipe of the AMiD paper
(which follows DistiLLM's GPT-2 / Dolly setup) where it has one.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from core.presets import (
    ANCHORS,
    DEFAULT_LOSS_CHUNK_SIZE,
    DIVERGENCES,
    PRESETS,
    Anchor,
    Divergence,
)
from core.recipe_settings import (
    MINIMISED_METRICS,
    SELECTABLE_METRICS,
    EvalSettings,
    InitSettings,
    RunKind,
    StudentOutputSettings,
)
from core.schedules import ADAPTIVE, ScheduleKind

DataFormat = Literal["auto", "dolly", "alpaca", "prompt_response", "messages"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
LrSchedule = Literal["cosine", "linear", "constant"]

PositiveInt = Annotated[int, Field(ge=1)]
MAX_EPOCHS = 1000
MAX_BATCH_SIZE = 4096
NonNegativeInt = Annotated[int, Field(ge=0)]
# Bounds on the numbers that reach the arithmetic: past them a run overflows to inf or NaN (a
# weight decay of 1e300, α = 1e308) or trains at nothing (a warmup of 1e18 steps). Each is far
# beyond what any recipe uses, so a refusal is a typo caught at submission, not a lost GPU run.
MAX_ABS_ALPHA = 100.0
MAX_ABS_AB = 10.0
MAX_CE_WEIGHT = 100.0
MAX_LEARNING_RATE = 1.0
MAX_WEIGHT_DECAY = 1.0
MAX_GRAD_ACCUM_STEPS = 4096
MAX_STEPS_BOUND = 10**9
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 100.0
MAX_NONFINITE_STEPS = 1000
# Students of one sweep: each holds its weights, gradients and AdamW moments beside the others
# (about 4× the student's size each), so a few fit where one teacher does; more are separate jobs.
MIN_SWEEP_STUDENTS = 2
MAX_SWEEP_STUDENTS = 8
# What a preset fills in: a sweep entry naming a preset takes all of it from the preset.
PRESET_FIELDS = ("alpha", "lambda", "divergence", "anchor", "ab_alpha", "ab_beta", "alpha_schedule")
# "field: reason", as the model-level checks word their errors.
_LEADING_FIELD = re.compile(r"^([A-Za-z_][\w.]*): (.*)$", re.DOTALL)
Alpha = Annotated[float, Field(ge=-MAX_ABS_ALPHA, le=MAX_ABS_ALPHA)]


class _Strict(BaseModel):
    # Unknown fields are refused: a typo in a settings file must not silently fall back to a default.
    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, validate_default=True, allow_inf_nan=False
    )


class DatasetSettings(_Strict):
    source: str = Field(
        description=(
            "Where the data is: a local .jsonl/.json/.parquet file (or a directory of them), or a "
            "`datasets` hub id."
        ),
        examples=["data/dolly.jsonl"],
        min_length=1,
    )
    format: DataFormat = Field(
        "auto",
        description=(
            "Row format: dolly (instruction, context, response), alpaca (instruction, input, "
            "output), prompt_response (prompt, response), messages (chat turns), or auto "
            "(detected from the first row's keys)."
        ),
    )
    split: str = Field("train", description="Split to read from a hub dataset.")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Renames of source columns to the format's field names, e.g. "
            '{"response": "answer"} reads the response from a column called `answer`.'
        ),
    )
    eval_size: NonNegativeInt = Field(
        64, description="Rows held out (deterministically, by seed) for evaluation."
    )
    max_rows: PositiveInt | None = Field(None, description="Use at most this many rows.")
    skip_malformed: bool = Field(
        False,
        description="Skip rows that cannot be parsed (and count them) instead of failing the run.",
    )


def _dataset_shorthand(value: Any) -> Any:
    return {"source": value} if isinstance(value, str) else value


# A bare string is read as `{source: ...}`; the request schema says so too (anyOf string or
# object), so a client generated from the OpenAPI document may send either.
DatasetField = Annotated[
    DatasetSettings,
    BeforeValidator(
        _dataset_shorthand,
        json_schema_input_type=Annotated[str, Field(min_length=1)] | DatasetSettings,
    ),
]


class ScheduleSettings(_Strict):
    kind: ScheduleKind = Field(
        "constant",
        description=(
            "constant, linear or cosine; adaptive (α only): from `start` toward `end` as the "
            "assistant's weight on the student rises (see w_ready)."
        ),
    )
    start: Alpha = Field(description="Value at the first step.")
    end: Alpha | None = Field(None, description="Value at the last step (defaults to start).")
    w_ready: float = Field(
        0.5,
        gt=0,
        le=1,
        description=(
            "adaptive only: the median weight w the assistant gives the student at the teacher's "
            "top token (under α = end) at which α reaches `end`."
        ),
    )

    @property
    def end_value(self) -> float:
        return self.start if self.end is None else self.end


class GenerationSettings(_Strict):
    max_new_tokens: PositiveInt = Field(128, description="Tokens generated per eval prompt.")
    do_sample: bool = Field(
        True, description="Sample (the paper: top_k=0, top_p=1, T=1) or decode greedily."
    )
    temperature: float = Field(
        1.0, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE, description="Sampling temperature."
    )
    top_k: NonNegativeInt = Field(0, description="Top-k filter; 0 turns it off.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus filter; 1 turns it off.")
    num_samples_kept: NonNegativeInt = Field(
        4, description="Sample generations kept with the eval metrics."
    )


class SweepEntry(_Strict):
    """One student of a sweep: the loss knobs it trains with, over the job's own settings."""

    preset: str | None = Field(None, description="A named loss setting, as the job's `preset`.")
    alpha: Alpha | None = Field(None, description="α of this student.")
    lam: float | None = Field(
        None, alias="lambda", ge=0.0, le=1.0, description="λ of this student, in [0, 1]."
    )
    divergence: Divergence | None = Field(None, description="Divergence of this student.")
    learning_rate: float | None = Field(
        None, gt=0, le=MAX_LEARNING_RATE, description="Peak AdamW learning rate of this student."
    )

    def overrides(self) -> dict[str, Any]:
        """The fields this entry sets, as a user writes them (`lambda`, not `lam`)."""
        return self.model_dump(by_alias=True, exclude_none=True)


class DistillSettings(_Strict):
    """Everything one distillation run needs."""

    # -- models and data -----------------------------------------------------------------------
    kind: RunKind = Field(
        "distill",
        description=(
            "distill (teacher → student), or sft: cross-entropy on the reference responses only "
            "(a teacher is optional and only measured against); its final student can start a "
            "later job as `job:<id>`."
        ),
    )
    teacher: str | None = Field(
        None,
        description=(
            "Teacher model: a hub id, a local directory, or `job:<id>` (an earlier job's "
            "student). Required unless kind is sft."
        ),
        examples=["gpt2-xl"],
        min_length=1,
    )
    student: str = Field(
        description="Student model: a hub id, a local directory, or `job:<id>`.",
        examples=["gpt2"],
        min_length=1,
    )
    dataset: DatasetField = Field(
        description="Training data; a bare string is read as `{source: ...}`."
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow model code from the model's repo (only if the operator allows it).",
    )

    # -- the AMiD loss -------------------------------------------------------------------------
    preset: str | None = Field(
        None,
        description=(
            f"A named loss setting ({', '.join(PRESETS)}). Its values fill alpha, lambda, "
            "divergence, anchor, ab_alpha and ab_beta; fields given explicitly override it."
        ),
    )
    alpha: Alpha = Field(
        -5.0,
        description=(
            "α: the mixing geometry of the assistant distribution (α=−1 arithmetic, α=1 geometric, "
            f"α>1 generalised means down to the support intersection), in ±{MAX_ABS_ALPHA:g}."
        ),
    )
    lam: float = Field(
        0.1,
        alias="lambda",
        ge=0.0,
        le=1.0,
        description="λ: the teacher's weight in the assistant mixture, in [0, 1]; 0 gives r = q.",
    )
    divergence: Divergence = Field(
        "ab", description=f"Divergence between anchor and assistant: {', '.join(DIVERGENCES)}."
    )
    anchor: Anchor = Field(
        "teacher", description=f"Which distribution the assistant is compared with: {ANCHORS}."
    )
    ab_alpha: float = Field(
        0.2, ge=-MAX_ABS_AB, le=MAX_ABS_AB, description="α of the α-β divergence (the paper: 0.2)."
    )
    ab_beta: float = Field(
        0.7, ge=-MAX_ABS_AB, le=MAX_ABS_AB, description="β of the α-β divergence (the paper: 0.7)."
    )
    alpha_schedule: ScheduleSettings | None = Field(
        None, description="Move α over training (overrides alpha)."
    )
    lambda_schedule: ScheduleSettings | None = Field(
        None, description="Move λ over training (overrides lambda)."
    )
    ce_weight: float = Field(
        0.0,
        ge=0.0,
        le=MAX_CE_WEIGHT,
        description="Weight of plain cross-entropy to the reference responses.",
    )
    loss_chunk_size: PositiveInt = Field(
        DEFAULT_LOSS_CHUNK_SIZE,
        description="Tokens per chunk inside the loss: peak extra memory scales with it.",
    )

    # -- training ------------------------------------------------------------------------------
    max_steps: PositiveInt | None = Field(
        None, description="Optimizer steps to run; when unset, `epochs` decides."
    )
    # Upper bounds no real run comes near (an extra zero or three is a typo): refused when the
    # job is submitted, not after it has loaded its models on a GPU. Without max_steps, the
    # epochs decide the steps; a huge value would overflow the step count at the start of the run.
    epochs: float = Field(
        1.0, gt=0, le=MAX_EPOCHS, description="Passes over the training split (if no max_steps)."
    )
    batch_size: PositiveInt = Field(8, le=MAX_BATCH_SIZE, description="Sequences per micro-batch.")
    grad_accum_steps: PositiveInt = Field(
        1, le=MAX_GRAD_ACCUM_STEPS, description="Micro-batches per optimizer step."
    )
    learning_rate: float = Field(
        5e-4, gt=0, le=MAX_LEARNING_RATE, description="Peak AdamW learning rate."
    )
    lr_schedule: LrSchedule = Field("cosine", description="Decay after warmup.")
    warmup_steps: NonNegativeInt = Field(
        0, le=MAX_STEPS_BOUND, description="Linear warmup steps (fewer than max_steps)."
    )
    weight_decay: float = Field(0.01, ge=0, le=MAX_WEIGHT_DECAY, description="AdamW weight decay.")
    max_nonfinite_steps: PositiveInt = Field(
        3,
        le=MAX_NONFINITE_STEPS,
        description=(
            "Steps in a row whose loss or gradient is not finite (each one skipped) before the "
            "run fails with NonFiniteLoss."
        ),
    )
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the gradient norm to this; null turns clipping off."
    )
    max_prompt_length: PositiveInt = Field(
        256, description="Prompt tokens kept (truncated from the left)."
    )
    max_length: PositiveInt = Field(
        512, description="Prompt + response tokens kept (the response truncated from the right)."
    )
    seed: int = Field(
        0,
        ge=-(2**63),
        le=2**63 - 1,  # torch.manual_seed takes a 64-bit integer
        description="Seeds data order, the split, dropout and sampling.",
    )
    precision: Precision = Field(
        "auto", description="auto = bf16 on CUDA, fp32 on CPU; the loss is fp32 inside regardless."
    )

    # -- the recipe around the loss (the paper's official runs) -----------------------------------
    init: InitSettings | None = Field(
        None, description="Fine-tune the student on the references first, in the same job."
    )
    student_outputs: StudentOutputSettings | None = Field(
        None,
        description="Train on responses the student samples, scored by the teacher (on-policy).",
    )
    lm_dataset: str | None = Field(
        None,
        min_length=1,
        description=(
            "Pretraining text for a language-modelling term at every step: a .txt file (one "
            "document per blank-line-separated block) or JSONL with a `text` field."
        ),
    )
    lm_weight: float = Field(1.0, ge=0.0, description="Weight of the LM term (the paper: 1).")
    select_best: str | None = Field(
        None,
        description=(
            f"Make the best-evaluated checkpoint by this metric the final student "
            f"({', '.join(SELECTABLE_METRICS)}; the loss and KL are minimised)."
        ),
    )
    preflight_action: Literal["warn", "refuse"] = Field(
        "warn",
        description=(
            "When the pre-flight finds the student too far from the teacher for α: always warn "
            "(median w below 0.1) in an event and the job record; `refuse` also stops a run whose "
            "median w is below 0.01 (the job fails with StudentTooFar). amid-auto refuses."
        ),
    )
    preflight_batches: NonNegativeInt = Field(
        4,
        description=(
            "Batches measured before training (median assistant weight w on the student, "
            "teacher–student KL); 0 skips the pre-flight."
        ),
    )

    # -- evaluation and checkpoints --------------------------------------------------------------
    evaluation: EvalSettings = Field(
        default_factory=EvalSettings, description="Sampling seeds, greedy decoding, teacher KL."
    )
    eval_datasets: dict[str, DatasetField] = Field(
        default_factory=dict,
        description=(
            "More evaluation sets, by name: each gives its own series (eval/<name>/rouge_l, ...)."
        ),
    )
    eval_interval: NonNegativeInt = Field(
        0, description="Evaluate every N steps (0 = only at the end)."
    )
    checkpoint_interval: NonNegativeInt = Field(
        0, description="Save a checkpoint every N steps (0 = only at the end)."
    )
    generation: GenerationSettings = Field(
        default_factory=GenerationSettings, description="How eval responses are generated."
    )
    eval_max_samples: PositiveInt = Field(
        64, description="Eval prompts generated for ROUGE-L at each evaluation."
    )
    eval_at_start: bool = Field(
        False,
        description="Also evaluate the student before the first step (a baseline for eval/rouge_l).",
    )

    # -- a sweep: several students, one teacher --------------------------------------------------
    sweep: list[SweepEntry] | None = Field(
        None,
        min_length=MIN_SWEEP_STUDENTS,
        max_length=MAX_SWEEP_STUDENTS,
        description=(
            f"Train {MIN_SWEEP_STUDENTS} to {MAX_SWEEP_STUDENTS} students from the same starting "
            "weights in lockstep on the same batches, each with its own loss knobs (alpha, "
            "lambda, divergence, preset, learning_rate over the job's own); the teacher runs "
            "once per batch for all of them. The students are ranked by select_best's metric "
            "(eval/rouge_l when unset)."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset_and_shorthands(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        name = data.get("preset")
        if name is None:
            return data
        if not isinstance(name, str) or name not in PRESETS:
            # Reported by the field validator below with the list of names.
            return data
        preset = PRESETS[name]
        given = set(data)
        defaults: dict[str, Any] = {
            "alpha": preset.alpha,
            "lambda": preset.lam,
            "divergence": preset.divergence,
            "anchor": preset.anchor,
            "ab_alpha": preset.ab_alpha,
            "ab_beta": preset.ab_beta,
        }
        if preset.refuses_far_student:
            defaults["preflight_action"] = "refuse"
        if preset.adaptive_alpha_start is not None:
            defaults["alpha_schedule"] = {
                "kind": ADAPTIVE,
                "start": preset.adaptive_alpha_start,
                "end": data.get("alpha", preset.alpha),
            }
        for key, value in defaults.items():
            if key not in given and not (key == "lambda" and "lam" in given):
                data[key] = value
        return data

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str | None) -> str | None:
        if value is not None and value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; expected one of {', '.join(PRESETS)}")
        return value

    @model_validator(mode="after")
    def _recipe_fits_the_kind(self) -> Self:
        if self.kind == "distill" and self.teacher is None:
            raise ValueError("teacher: required for a distillation (kind: distill)")
        if self.kind == "sft" and (self.init is not None or self.student_outputs is not None):
            raise ValueError("init and student_outputs: only a distillation has them, not kind sft")
        if self.select_best is not None and self.select_best not in SELECTABLE_METRICS:
            raise ValueError(
                f"select_best: unknown metric {self.select_best!r}; expected one of "
                f"{', '.join(SELECTABLE_METRICS)}"
            )
        if self.lambda_schedule is not None and self.lambda_schedule.kind == ADAPTIVE:
            raise ValueError("lambda_schedule: kind adaptive is for alpha_schedule only")
        for name in self.eval_datasets:
            if not name or "/" in name:
                raise ValueError(f"eval_datasets: name {name!r} must be non-empty, without '/'")
        return self

    @model_validator(mode="after")
    def _sweep_is_shareable(self) -> Self:
        if self.sweep is None:
            return self
        # Each refusal names what the lockstep loop cannot share between the students.
        if self.kind == "sft":
            raise ValueError("sweep: shares a teacher's forward; kind sft has no teacher")
        if self.student_outputs is not None:
            raise ValueError(
                "student_outputs: each student would sample its own responses, so the students "
                "of a sweep would not share batches"
            )
        for name, schedule in (
            ("alpha_schedule", self.alpha_schedule),
            ("lambda_schedule", self.lambda_schedule),
        ):
            if schedule is not None:
                raise ValueError(f"{name}: a sweep's entries choose α and λ; drop the schedule")
        for index in range(len(self.sweep)):
            student = self.student_settings(index)
            if student.alpha_schedule is not None:
                raise ValueError(
                    f"sweep.{index}.preset: {student.preset} moves α with a schedule of its own; "
                    "a sweep's students keep a fixed α"
                )
        return self

    def student_settings(self, index: int) -> DistillSettings:
        """The settings of the sweep's student `index`: the job's, with its entry's knobs."""
        assert self.sweep is not None, "only a sweep has students"
        entry = self.sweep[index].overrides()
        # Only the run's own fields: a request body (a subclass) also holds the job's name, tags...
        own = set(DistillSettings.model_fields) - {"sweep"}
        base = self.model_dump(mode="json", by_alias=True, include=own)
        if "preset" in entry:
            # The entry's preset decides every knob it covers, not the job's explicit values.
            base = {key: value for key, value in base.items() if key not in PRESET_FIELDS}
        try:
            return DistillSettings.model_validate({**base, **entry})
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            message = str(error["msg"]).removeprefix("Value error, ")
            if not where and (leading := _LEADING_FIELD.match(message)):
                where, message = leading.groups()
            raise ValueError(f"sweep.{index}{'.' + where if where else ''}: {message}") from exc

    @property
    def best_is_lowest(self) -> bool:
        """Whether `select_best`'s metric is better when lower (a loss, a KL)."""
        return self.select_best in MINIMISED_METRICS

    @model_validator(mode="after")
    def _loss_is_not_identically_zero(self) -> Self:
        # r is the anchor itself when all of λ's weight sits on it: the loss is 0 at every step.
        if self.lambda_schedule is None:
            if self.anchor == "teacher" and self.lam == 1.0:
                raise ValueError(
                    "lambda: 1 with anchor 'teacher' makes the assistant equal the teacher, so the "
                    "loss is identically zero"
                )
            if self.anchor == "student" and self.lam == 0.0:
                raise ValueError(
                    "lambda: 0 with anchor 'student' makes the assistant equal the student, so the "
                    "loss is identically zero"
                )
        else:
            for bound in (self.lambda_schedule.start, self.lambda_schedule.end_value):
                if not 0.0 <= bound <= 1.0:
                    raise ValueError("lambda_schedule: start and end must lie in [0, 1]")
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(
                "warmup_steps: must be below max_steps, or the learning rate never reaches its peak"
            )
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                "max_prompt_length: must be below max_length so responses keep at least one token"
            )
        return self

    def loss_knobs(self) -> dict[str, Any]:
        """The keyword arguments of `core.losses.amid_loss` other than α and λ."""
        return {
            "divergence": self.divergence,
            "anchor": self.anchor,
            "ab_alpha": self.ab_alpha,
            "ab_beta": self.ab_beta,
        }

    def public_dict(self) -> dict[str, Any]:
        """The settings as a user writes them (`lambda`, not `lam`), every default filled in."""
        return self.model_dump(mode="json", by_alias=True)
