"""The store's JSON records, typed and versioned: every one is written and read through these models.

One model per record of the store layout (:mod:`fl_tasks.store.base`)::

    HEAD.json                        Head
    rounds/<r>/plan.json             Plan            (distribute)
    rounds/<r>/updates/<silo>.json   Manifest        (train)
    rounds/<r>/updates/<silo>.status.json  TrainStatus  (train, when it fails)
    rounds/<r>/validation/<silo>.json      Verdict     (validate)
    rounds/<r>/result.json           Result          (aggregate)
    rounds/<r>/evaluation/<silo>.json      Evaluation  (evaluate)
    rounds/<r>/registry.json         RegistrySummary (register)
    rounds/<r>/approval.json         ApprovalRecord  (register, promote: approval required)
    champion.json                    ChampionRecord  (who holds `champion`: register, promote, CLI)
    lost/<dag_run_id>.json           LostRound       (distribute/aggregate of a run that lost a round)
    rounds/<r>/regions/<region>.json RegionPartial   (aggregate_region, jobs with regions)

Jobs with regions add ``regions``/``across_regions`` to Plan and ``regions`` to Result (schema
version 3); a flat job's records are written without those keys, byte for byte as before.

Field names are the JSON keys the store has always held, so a store written before these models
still reads. Each record carries ``schema_version``; a record without one was written before it
existed and reads as version 1 (:func:`parse` marks it so, nested records included). A reader
refuses a record from a newer schema instead of guessing. Pure (pydantic only): the Airflow side
may import it to read the store.
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    ValidationInfo,
    model_serializer,
    model_validator,
)

from fl_tasks.spec import AcrossRegions, ConfigScalar, DifferentialPrivacy, Guards, Promotion, Quorum, Strategy
from fl_tasks.strategies import V1_DEFAULTS

#: The newest schema version this code writes (and reads).
#: 1: the records as first written (no ``schema_version`` key); strategy parameters as the spec gave
#:    them, defaults implied by the code of the time.
#: 2: strategy parameters by Flower's current names, every one spelled out (plan.json, result.json).
#: 3: the regional tier: RegionPartial records, ``regions`` in plan.json and result.json. Only
#:    records that carry regional fields are written as version 3; flat jobs still write version 2.
SCHEMA_VERSION = 3
#: The version of records without regional fields (unchanged for flat jobs).
FLAT_SCHEMA_VERSION = 2
#: Validation context of records read from the store (a missing ``schema_version`` means 1).
STORED = {"stored": True}

MetricValue = StrictBool | StrictInt | StrictFloat
#: ``num-examples`` as a client reported it: kept as given, the guards judge it (a bad count is a
#: rejection reason, not a record error).
ExampleCount = StrictInt | StrictFloat | None


class RecordError(ValueError):
    """A stored record does not match its schema: names the object and the field."""


class Record(BaseModel):
    """Base of every stored record."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = Field(FLAT_SCHEMA_VERSION, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _version(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and info.context and info.context.get("stored"):
            version = data.get("schema_version", 1)
            if isinstance(version, int) and version > SCHEMA_VERSION:
                raise ValueError(
                    f"schema_version {version} is newer than this airfed reads ({SCHEMA_VERSION}); upgrade airfed"
                )
            if "schema_version" not in data:
                data = {**data, "schema_version": 1}
        return data


def _v1_strategy(data: Any, info: ValidationInfo) -> Any:
    """A stored version-1 record's strategy, with the defaults it was computed with made explicit."""
    if not (isinstance(data, dict) and info.context and info.context.get("stored")):
        return data
    strategy = data.get("strategy")
    if data.get("schema_version", 1) == 1 and isinstance(strategy, dict) and strategy.get("name") in V1_DEFAULTS:
        params = {**V1_DEFAULTS[strategy["name"]], **(strategy.get("params") or {})}
        data = {**data, "strategy": {**strategy, "params": params}}
    return data


class ObjectRef(BaseModel):
    """A stored object and the sha256 it must have when read."""

    model_config = ConfigDict(extra="forbid")

    key: str
    sha256: str


class Head(Record):
    """``HEAD.json``: the latest committed round. Written last, by aggregate."""

    job: str
    round: int = Field(ge=1)
    global_key: str
    global_sha256: str
    result_key: str
    result_sha256: str
    server_state: ObjectRef | None = None
    dag_run_id: str

    @property
    def global_ref(self) -> ObjectRef:
        return ObjectRef(key=self.global_key, sha256=self.global_sha256)


class PlanSilo(BaseModel):
    """A silo as a round's steps see it (its data location and Flower node config)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    data: str
    node_config: dict[str, ConfigScalar] = Field(default_factory=dict)


class PlanRegion(BaseModel):
    """A region as a round sees it: its silos and its quorum."""

    model_config = ConfigDict(extra="forbid")

    name: str
    silos: list[str]
    quorum: Quorum = Field(default_factory=Quorum)


REGIONAL_PLAN_KEYS = ("regions", "across_regions")
REGIONAL_RESULT_KEYS = ("regions",)


def _regional_version(record: Record, regional: object) -> Record:
    """A new record with regional fields is schema version 3 (an older reader refuses it by name)."""
    if regional is not None and "schema_version" not in record.model_fields_set:
        record.schema_version = SCHEMA_VERSION
    return record


def _without_absent(record: BaseModel, handler: SerializerFunctionWrapHandler, keys: tuple[str, ...]) -> Any:
    """The record's JSON without regional keys that are unset: a flat job's records stay as before."""
    data = handler(record)
    for key in keys:
        if data.get(key) is None:
            data.pop(key, None)
    return data


class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fraction_train: float
    seed: int


class RegistryNames(BaseModel):
    """The MLflow names of the job, resolved from the spec (``registry``)."""

    model_config = ConfigDict(extra="forbid")

    model_name: str
    experiment: str


class Plan(Record):
    """``rounds/<r>/plan.json``: everything the round's steps need, fixed by distribute."""

    job: str
    round: int = Field(ge=1)
    dag_run_id: str
    chain_id: str | None = Field(None, description="The first DAG run of the chain this round belongs to.")
    slot: int | None = Field(None, description="Round slot of plans written before rounds were chained runs.")
    created_at: float
    spec_hash: str
    client_app: str
    strategy: Strategy
    quorum: Quorum = Field(default_factory=Quorum)
    guards: Guards = Field(default_factory=Guards)
    differential_privacy: DifferentialPrivacy | None = None
    promotion: Promotion = Field(default_factory=Promotion)
    registry: RegistryNames
    training: dict[str, ConfigScalar]
    silos: list[PlanSilo]
    sampled: list[str] | None = Field(None, description="Silos that train this round (absent: all).")
    sampling: Sampling | None = None
    input_global: ObjectRef
    previous_head: Head | None = None
    regions: list[PlanRegion] | None = Field(None, description="The regional tier (absent: a flat job).")
    across_regions: AcrossRegions | None = None

    _v1 = model_validator(mode="before")(_v1_strategy)
    _regional = model_validator(mode="after")(lambda self: _regional_version(self, self.regions))
    _flat = model_serializer(mode="wrap")(lambda self, handler: _without_absent(self, handler, REGIONAL_PLAN_KEYS))

    def region_of(self, silo: str) -> PlanRegion | None:
        for region in self.regions or []:
            if silo in region.silos:
                return region
        return None

    def region(self, name: str) -> PlanRegion:
        for region in self.regions or []:
            if region.name == name:
                return region
        raise ValueError(f"region {name!r} is not part of round {self.round} of job {self.job}")

    @property
    def sampled_silos(self) -> list[str]:
        return list(self.sampled) if self.sampled is not None else [s.name for s in self.silos]

    def silo(self, name: str | None) -> PlanSilo:
        for silo in self.silos:
            if silo.name == name:
                return silo
        raise ValueError(f"silo {name!r} is not part of round {self.round} of job {self.job}")

    def client_config(self) -> dict[str, ConfigScalar]:
        """The ConfigRecord sent to the ClientApp: the training config plus Flower's ``server-round``."""
        return {**self.training, "server-round": self.round}


class Manifest(Record):
    """``rounds/<r>/updates/<silo>.json``: a silo's update, written by train after the weights."""

    job: str
    round: int
    silo: str
    dag_run_id: str
    key: str
    sha256: str
    num_examples: ExampleCount = None
    metrics: dict[str, MetricValue] = Field(default_factory=dict)
    global_sha256: str
    seconds: float | None = None

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef(key=self.key, sha256=self.sha256)


class TrainStatus(Record):
    """``rounds/<r>/updates/<silo>.status.json``: why a silo's train step left no update."""

    silo: str
    round: int
    dag_run_id: str
    state: Literal["failed", "timed_out"]
    reason: str

    def describe(self) -> str:
        return f"no update: train {self.state.replace('_', ' ')}: {self.reason}"


class Verdict(Record):
    """``rounds/<r>/validation/<silo>.json``: the silo's own check of its update."""

    job: str
    round: int
    silo: str
    dag_run_id: str
    accepted: bool
    reason: str = ""
    metrics: dict[str, MetricValue] = Field(default_factory=dict)
    update_sha256: str | None = None
    update_norm: float | None = None


class Evaluation(Record):
    """``rounds/<r>/evaluation/<silo>.json``: federated evaluation of the round's new global."""

    job: str
    round: int
    silo: str
    global_sha256: str
    num_examples: ExampleCount = None
    metrics: dict[str, MetricValue] = Field(default_factory=dict)


class AcceptedUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str
    num_examples: StrictInt | StrictFloat
    update_norm: float | None = None


class RegionOutcome(BaseModel):
    """What one region contributed to a round (result.json, MLflow): its partial or why it has none."""

    model_config = ConfigDict(extra="forbid")

    contributed: bool
    reason: str = ""
    partial: ObjectRef | None = None
    record: ObjectRef | None = Field(None, description="rounds/<r>/regions/<region>.json and its sha256.")
    accepted: list[str] = Field(default_factory=list)
    rejected: dict[str, str] = Field(default_factory=dict)
    total_weight: float = 0.0


class RegionPartial(Record):
    """``rounds/<r>/regions/<region>.json``: a region's partial aggregate, written by aggregate_region to
    the job's store (the only object of the region that crosses). ``kind``: ``sum`` (FedAvg family:
    per tensor the float64 sum of num_examples × update, exact) or ``model`` (robust strategies: the
    region's robust aggregate, weighted across regions by ``total_weight`` or combined by median)."""

    job: str
    round: int
    region: str
    dag_run_id: str
    contributed: bool
    reason: str = ""
    kind: Literal["sum", "model"] | None = None
    partial: ObjectRef | None = None
    total_weight: float = 0.0
    accepted: dict[str, AcceptedUpdate] = Field(default_factory=dict)
    rejected: dict[str, str] = Field(default_factory=dict)
    input_global_sha256: str
    strategy: str

    _regional = model_validator(mode="after")(lambda self: _regional_version(self, True))


class Result(Record):
    """``rounds/<r>/result.json``: accepted and rejected silos, and (committed) the new global."""

    job: str
    round: int
    dag_run_id: str
    committed: bool = True
    accepted: dict[str, AcceptedUpdate] = Field(default_factory=dict)
    rejected: dict[str, str] = Field(default_factory=dict)
    input_global: ObjectRef
    # uncommitted rounds
    reason: str | None = None
    # committed rounds
    sampled: list[str] | None = None
    strategy: Strategy | None = None
    differential_privacy: DifferentialPrivacy | None = None
    new_global: ObjectRef | None = None
    server_state_in: ObjectRef | None = None
    server_state: ObjectRef | None = None
    committed_at: float | None = None
    regions: dict[str, RegionOutcome] | None = Field(None, description="Per region (jobs with regions).")

    _v1 = model_validator(mode="before")(_v1_strategy)
    _regional = model_validator(mode="after")(lambda self: _regional_version(self, self.regions))
    _flat = model_serializer(mode="wrap")(lambda self, handler: _without_absent(self, handler, REGIONAL_RESULT_KEYS))

    @model_validator(mode="after")
    def _committed_has_global(self) -> Result:
        if self.committed and (self.new_global is None or self.strategy is None):
            raise ValueError("a committed result needs 'new_global' and 'strategy'")
        return self


class RegistrySummary(Record):
    """``rounds/<r>/registry.json``: what register did (what ``airfed run`` prints per round)."""

    job: str
    round: int
    dag_run_id: str
    accepted: list[str]
    rejected: dict[str, str]
    train_loss: float | None = None
    metrics: dict[str, float]
    promotion_metric: str
    promotion_value: float | None = Field(None, description="None: registered late, never evaluated")
    registry_model: str
    registry_version: int
    champion_version: int | None = Field(None, description="None: no champion yet")
    promoted: bool
    awaiting_approval: bool = Field(False, description="An improving version held for a person's approval")
    silo_metrics: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Each silo's federated evaluation metrics of this round's global"
    )
    mlflow_experiment_id: str
    mlflow_run_id: str
    mlflow_parent_run_id: str
    tracking_uri: str
    started_at: float
    finished_at: float


class ApprovalRecord(Record):
    """``rounds/<r>/approval.json``: a candidate version awaiting a person, and their answer.

    ``pending`` is written by register; ``approved`` / ``rejected`` by the approval DAG's promote
    step (a rejection ``timed_out`` when nobody answered within ``promotion.approval_timeout``)."""

    job: str
    round: int
    version: int
    dag_run_id: str
    state: Literal["pending", "approved", "rejected"]
    approval_dag_id: str
    approval_run_id: str
    requested_at: float
    by: str | None = None
    at: float | None = None
    reason: str = ""
    timed_out: bool = False


class ChampionRecord(Record):
    """``champion.json``: the version holding `champion` and the last move (mirrors the MLflow alias
    for readers without MLflow, such as the jobs page). ``action``: ``improved`` (register, no
    approval needed), ``approved``, ``promote`` or ``rollback`` (``airfed promote`` / ``rollback``)."""

    job: str
    model_name: str
    version: int
    round: int | None = None
    previous_version: int | None = None
    action: Literal["improved", "approved", "promote", "rollback"]
    by: str
    at: float
    reason: str = ""


class LostRound(Record):
    """``lost/<dag_run_id>.json``: a run stopped because another run holds or committed its round
    (:mod:`fl_tasks.commit`). ``stage``: ``plan`` (the round was claimed), ``commit`` (another run
    committed it first), ``input`` (HEAD moved past the global the round trained from)."""

    job: str
    round: int
    dag_run_id: str
    winner: str | None = None
    stage: Literal["plan", "commit", "input", "conflict"]
    reason: str
    at: float


R = TypeVar("R", bound=BaseModel)


def dump(record: BaseModel) -> bytes:
    """Canonical JSON bytes (sorted keys, indented): the same record always has the same sha256."""
    return (json.dumps(record.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


def parse(model: type[R], data: bytes | str | dict, where: str) -> R:
    """Validate stored JSON as ``model``; :class:`RecordError` names ``where`` and each bad field."""
    try:
        raw = json.loads(data) if isinstance(data, bytes | str) else data
    except ValueError as exc:
        raise RecordError(f"{where}: not valid JSON: {exc}") from None
    try:
        return model.model_validate(raw, context=STORED)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(record)'}: {err['msg']}" for err in exc.errors()
        )
        raise RecordError(f"{where}: not a valid {model.__name__} record: {problems}") from None
