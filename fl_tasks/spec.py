"""The job spec: pydantic models for the YAML a user drops into ``dags/``.

The models are the single source of truth: ``airfed schema`` exports their JSON Schema, the loader
and ``airfed validate`` use them, the DAG builder consumes the validated objects, and the steps
receive the same model (validated again from JSON), so a default is defined here and nowhere else.
Unknown fields are errors everywhere (``extra="forbid"``). Pure (pydantic only; croniter lazily):
both halves import it, the Airflow side at DAG-parse time.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from fractions import Fraction
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from fl_tasks import strategies
from fl_tasks.strategies import STRATEGIES, StrategyParams

NAME_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # DNS-1123 label: valid as a pod name part
JOB_RE = r"^[a-z0-9][a-z0-9_-]{0,62}$"
IMPORT_REF_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
CRON_PRESETS = {"@once", "@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly", "@annually"}
#: Most silos a job may have: Airflow's default ``[core] max_map_length``, the largest fan-out it maps a
#: task over from an upstream result. airfed maps per-silo steps over a list fixed at parse time,
#: which that setting does not bound; the cap keeps jobs within it should the silo list ever come
#: from a step's result (e.g. the sampled silos), and a round's fan-out within what one scheduler loop
#: handles comfortably.
MAX_SILOS = 1024
#: env names that carry credentials: they must come from Kubernetes Secrets / the worker env.
SECRET_ENV_RE = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY)", re.IGNORECASE)

ConfigScalar = int | float | bool | str


def ceil_fraction(fraction: float, n: int) -> int:
    """ceil(fraction × n) in decimal terms: 0.07 × 100 is 7, not the 8 that float rounding gives."""
    return math.ceil(Fraction(str(fraction)) * n)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_import_ref(value: str) -> str:
    if not IMPORT_REF_RE.match(value):
        raise ValueError(f"{value!r} is not a 'module:attribute' reference (e.g. 'my_pkg.client:app')")
    return value


ImportRef = Annotated[str, Field(description="Python reference 'package.module:attribute'.")]


class SecretRef(Strict):
    """A Kubernetes Secret exposed to the step's pod as env vars (never a literal value)."""

    secret: str = Field(pattern=NAME_RE, description="Name of the Kubernetes Secret.")
    key: str | None = Field(None, description="One key of the Secret; omit to expose every key.")
    env: str | None = Field(None, description="Env var name for `key` (defaults to the key).")

    @model_validator(mode="after")
    def _env_needs_key(self) -> SecretRef:
        if self.env and not self.key:
            raise ValueError("'env' needs 'key': name the Secret key to expose as this env var")
        return self


class Placement(Strict):
    """Where a step's pod runs. Ignored by the local runner."""

    kubernetes_conn_id: str | None = Field(None, description="Airflow connection of the silo's cluster.")
    namespace: str | None = Field(None, pattern=NAME_RE)
    service_account_name: str | None = None
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    resources: dict[Literal["requests", "limits"], dict[str, str | int]] = Field(default_factory=dict)
    image_pull_secrets: list[str] = Field(default_factory=list)
    secrets: list[SecretRef] = Field(default_factory=list)
    volumes: list[dict[str, Any]] = Field(
        default_factory=list, description="Pod volumes (Kubernetes API form), e.g. the silo's data PVC."
    )
    volume_mounts: list[dict[str, Any]] = Field(
        default_factory=list, description="Mounts of those volumes into the step container (API form)."
    )


def _check_env(env: dict[str, str]) -> dict[str, str]:
    for name in env:
        if SECRET_ENV_RE.search(name):
            raise ValueError(
                f"env {name!r} looks like a credential; give it as a Kubernetes Secret ref under "
                "placement.secrets (or in the worker environment), never as a literal value in a spec"
            )
    return env


class Silo(Strict):
    name: str = Field(pattern=NAME_RE, max_length=40, description="Silo name (DNS label).")
    data: str = Field(description="Data location, handed to the client app as node config 'data-path'.")
    node_config: dict[str, ConfigScalar] = Field(
        default_factory=dict, description="Extra Flower node config for this silo's ClientApp."
    )
    placement: Placement = Field(default_factory=Placement)
    env: dict[str, str] = Field(default_factory=dict, description="Non-secret env vars for this silo's steps.")
    region: str | None = Field(
        None, description="The region whose aggregator and store this silo uses (required when `regions` is given)."
    )

    _env = field_validator("env")(_check_env)


class ModelInit(Strict):
    """The round-1 global model: a factory returning a torch state dict, or a safetensors seed."""

    init: ImportRef | None = Field(None, description="'module:function' returning a torch state_dict.")
    seed: str | None = Field(None, description="Path to a .safetensors file with the initial weights.")

    _init = field_validator("init")(lambda v: v if v is None else _check_import_ref(v))

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelInit:
        if bool(self.init) == bool(self.seed):
            raise ValueError("give exactly one of 'init' (module:function) or 'seed' (.safetensors path)")
        return self


class Strategy(Strict):
    """The aggregation strategy, named and parameterised as Flower's ``flwr.serverapp.strategy`` classes
    (each parameter documented once, in :mod:`fl_tasks.strategies`). Legacy Flower names are mapped
    to the current ones with a :class:`~fl_tasks.strategies.StrategyDeprecation` warning, so the
    model always holds current names; ranges are checked as Flower's classes would meet them."""

    name: str = Field("FedAvg", description=f"Flower strategy name: {', '.join(STRATEGIES)}.")
    params: dict[str, ConfigScalar] = Field(default_factory=dict, description="The strategy's parameters.")
    fraction_train: float = Field(
        1.0, gt=0, le=1, description="Fraction of silos sampled to train each round (Flower's fraction_train)."
    )
    sample_seed: int = Field(0, description="Seed of the per-round silo sample (recorded in plan.json).")

    @model_validator(mode="before")
    @classmethod
    def _current_names(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("name", "FedAvg"), str) and isinstance(
            data.get("params", {}), dict
        ):
            name, params = strategies.normalize(data.get("name", "FedAvg"), data.get("params"))
            data = {**data, "name": name, "params": params}
        return data

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        strategies.strategy_class(value)  # ValueError lists the known names
        return value

    @field_validator("params")
    @classmethod
    def _in_range(cls, value: dict[str, ConfigScalar], info: ValidationInfo) -> dict[str, ConfigScalar]:
        name = info.data.get("name")
        if name is None:  # the name itself is wrong: reported on its own
            return value
        try:
            strategies.check_params(name, value)
        except ValidationError as exc:  # located at params.<parameter>, naming the value given
            raise ValidationError.from_exception_data(
                "params",
                [
                    InitErrorDetails(
                        type=PydanticCustomError("strategy_param", "{problem}",
                                                 {"problem": strategies.problem(name, err)}),
                        loc=err["loc"],
                        input=err["input"],
                    )
                    for err in exc.errors()
                ],
            ) from None
        return value

    def parameters(self) -> StrategyParams:
        """The validated parameter model, defaults filled in."""
        return strategies.check_params(self.name, self.params)

    def resolved(self) -> Strategy:
        """This strategy with every parameter spelled out (what plan.json records)."""
        return self.model_copy(update={"params": self.parameters().model_dump()})

    def client_config(self) -> dict[str, ConfigScalar]:
        """Parameters the clients apply, sent in their train config (FedProx's ``proximal_mu``)."""
        params = self.parameters()
        return {k: getattr(params, k) for k in params.client_params}


class Quorum(Strict):
    min_silos: int = Field(1, ge=1, description="Fewest accepted updates a round may commit with.")
    min_fraction: float = Field(0.0, ge=0.0, le=1.0, description="Fewest accepted updates, as a fraction.")

    def required(self, n_silos: int) -> int:
        """Fewest accepted updates a round over ``n_silos`` (sampled) silos commits with."""
        return max(1, self.min_silos, ceil_fraction(self.min_fraction, n_silos))


#: Strategies whose regional partials combine exactly (weighted sum + total examples): FedAvg over the
#: regions' partials equals FedAvg over all accepted updates; a server optimiser then runs once, globally.
EXACT_REGION_STRATEGIES = ("FedAvg", "FedProx", "FedAvgM", "FedAdagrad", "FedAdam", "FedYogi")
#: How regional aggregates of a robust strategy are combined (robust rules do not compose exactly).
ACROSS_REGION_RULES = ("FedAvg", "FedMedian")


class Region(Strict):
    """A group of silos with its own aggregator and store: silo updates stay in the region's store and
    only the region's partial aggregate crosses to the global aggregator."""

    name: str = Field(pattern=NAME_RE, max_length=40, description="Region name (DNS label).")
    store: str | None = Field(
        None, description="The region's store, 'file:///path' or 's3://bucket/prefix' (default: the job's store)."
    )
    store_secrets: list[SecretRef] = Field(
        default_factory=list,
        description="Credentials of the region's store: given to this region's silo and regional pods only.",
    )
    placement: Placement = Field(default_factory=Placement, description="Where the regional aggregator runs.")
    quorum: Quorum = Field(default_factory=Quorum, description="Fewest accepted updates of the region.")

    @field_validator("store")
    @classmethod
    def _store_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(file://[/$~]|s3://[^/]+)", value):
            raise ValueError(f"{value!r} is not a store URL; use 'file:///path' or 's3://bucket/prefix'")
        return value


class AcrossRegions(Strict):
    """The global tier of a job with regions: how many regions must contribute, and (robust strategies
    only) the named rule that combines the regions' robust aggregates."""

    min_regions: int = Field(1, ge=1, description="Fewest regions that must contribute a partial for a commit.")
    rule: Literal["FedAvg", "FedMedian"] | None = Field(
        None,
        description="Robust strategies only: combine the regional aggregates by their example-weighted mean "
        "(FedAvg) or coordinate-wise median (FedMedian). FedAvg-family strategies compose exactly: omit it.",
    )


class Guards(Strict):
    max_update_norm: float | None = Field(
        None, gt=0, description="Reject updates whose L2 distance from the global exceeds this."
    )
    max_num_examples: int | None = Field(
        None, ge=1, description="Reject updates claiming more training examples than this."
    )


class Execution(Strict):
    """Timeouts and retries of the steps (Airflow's execution_timeout / retries / retry_delay)."""

    silo_timeout_seconds: int = Field(3600, ge=1, description="Per-silo step limit (train, validate, evaluate).")
    server_timeout_seconds: int = Field(3600, ge=1, description="Server step limit (distribute, aggregate, register).")
    retries: int = Field(1, ge=0, le=20, description="Retries of a failed step.")
    retry_delay_seconds: int = Field(30, ge=0)
    retry_exponential_backoff: float = Field(
        2.0, ge=0, description="Multiplier of the retry delay per attempt (Airflow's); 0 = constant delay."
    )
    max_retry_delay_seconds: int = Field(900, ge=0)


class Kubernetes(Strict):
    """Kubernetes runner options (ignored by the local runner)."""

    deferrable: bool = Field(
        False,
        description="Run silo pods deferrable (the provider's deferrable=True): while a silo trains, its task "
        "waits in Airflow's triggerer instead of holding a worker slot. The pod's activeDeadlineSeconds "
        "(step timeout + grace) still stops it, since Airflow does not time out a deferred task.",
    )


class DifferentialPrivacy(Strict):
    """Fixed clipping with Gaussian noise, as Flower's DifferentialPrivacy{Server,Client}SideFixedClipping."""

    mode: Literal["server", "client"] = Field(
        description="'server': the aggregator clips each update; 'client': each silo clips its own update."
    )
    noise_multiplier: float = Field(ge=0)
    clipping_norm: float = Field(gt=0)


#: How long a candidate waits for a person by default (``promotion.approval_timeout``): a week.
DEFAULT_APPROVAL_TIMEOUT_SECONDS = 7 * 24 * 3600


class Promotion(Strict):
    metric: str = Field("accuracy", description="Federated evaluation metric that decides `champion`.")
    direction: Literal["maximize", "minimize"] = "maximize"
    approval: Literal["none", "required"] = Field(
        "none",
        description="'none': `champion` moves when the metric improves. 'required': an improving version is a "
        "candidate that moves `champion` only once a person approves it in Airflow (the job's "
        "'<job>__approval' DAG); training rounds never wait on it.",
    )
    approval_timeout: int = Field(
        DEFAULT_APPROVAL_TIMEOUT_SECONDS, ge=1,
        description="Seconds a candidate waits for an answer; no answer in time counts as a rejection.",
    )


class Registry(Strict):
    model_name: str | None = Field(None, description="MLflow registered model (default: the job name).")
    experiment: str | None = Field(None, description="MLflow experiment (default: 'airfed/<job>').")


class Data(Strict):
    """How silo data is prepared on first use (examples and demos; real silos bring their own)."""

    prepare: ImportRef | None = Field(None, description="'module:function(silos, options)' creating missing data.")
    options: dict[str, ConfigScalar] = Field(default_factory=dict, description="Passed to `prepare`.")

    _prepare = field_validator("prepare")(lambda v: v if v is None else _check_import_ref(v))


class JobSpec(Strict):
    """A federated learning job: one Airflow DAG whose run is one round; a trigger chains `rounds` runs."""

    job: str = Field(pattern=JOB_RE, description="Job name; also the DAG id.")
    description: str = ""
    schedule: str | None = Field(None, description="Cron expression or preset; null = trigger only.")
    rounds_per_run: int = Field(
        1, ge=1, le=100, description="Rounds a scheduled or triggered run performs (one chained DAG run each)."
    )
    max_rounds_per_run: int | None = Field(
        None, ge=1, le=100, description="Most rounds the trigger form may ask for (default rounds_per_run)."
    )
    client_app: ImportRef = Field(description="The Flower ClientApp, 'module:attribute'.")
    model: ModelInit
    strategy: Strategy = Field(default_factory=Strategy)
    quorum: Quorum = Field(default_factory=Quorum)
    guards: Guards = Field(default_factory=Guards)
    differential_privacy: DifferentialPrivacy | None = None
    execution: Execution = Field(default_factory=Execution)
    training: dict[str, ConfigScalar] = Field(
        default_factory=dict, description="Train config (Flower ConfigRecord) sent to the client app."
    )
    promotion: Promotion = Field(default_factory=Promotion)
    registry: Registry = Field(default_factory=Registry)
    runner: Literal["local", "kubernetes"] = "local"
    image: str | None = Field(None, description="The fl-task image (kubernetes runner).")
    placement: Placement = Field(default_factory=Placement, description="Server-side steps' placement.")
    kubernetes: Kubernetes = Field(default_factory=Kubernetes)
    env: dict[str, str] = Field(default_factory=dict, description="Non-secret env vars for every step.")
    data: Data = Field(default_factory=Data)
    silos: list[Silo] = Field(min_length=1)
    regions: list[Region] = Field(
        default_factory=list, description="Optional regional tier: each silo names its region (see README, Regions)."
    )
    across_regions: AcrossRegions | None = Field(None, description="The global tier of a job with regions.")
    tags: list[str] = Field(default_factory=list)

    _client_app = field_validator("client_app")(_check_import_ref)
    _env = field_validator("env")(_check_env)

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or value in CRON_PRESETS or (info.context or {}).get("in_step"):
            return value  # a step receives a spec the Airflow side validated; it has no croniter
        from croniter import croniter

        if not croniter.is_valid(value):
            raise ValueError(f"{value!r} is not a valid cron expression (e.g. '0 3 * * *') or preset")
        return value

    @field_validator("silos")
    @classmethod
    def _unique_silos(cls, silos: list[Silo]) -> list[Silo]:
        if len(silos) > MAX_SILOS:
            raise ValueError(
                f"{len(silos)} silos; a job may have at most {MAX_SILOS} (Airflow's default [core] max_map_length, "
                "the largest fan-out of one mapped task): split the silos into regions or jobs"
            )
        seen: set[str] = set()
        for silo in silos:
            if silo.name in seen:
                raise ValueError(f"duplicate silo name {silo.name!r}")
            seen.add(silo.name)
        return silos

    @model_validator(mode="after")
    def _cross_checks(self) -> JobSpec:
        if self.quorum.min_silos > len(self.silos):
            raise ValueError(
                f"quorum.min_silos={self.quorum.min_silos} is larger than the number of silos ({len(self.silos)})"
            )
        if self.max_rounds_per_run is not None and self.max_rounds_per_run < self.rounds_per_run:
            raise ValueError("max_rounds_per_run must be >= rounds_per_run")
        self.strategy.parameters().check_silo_count(len(self.silos))
        if self.runner == "kubernetes" and not self.image:
            raise ValueError("runner 'kubernetes' needs 'image' (the fl-task image)")
        problems = region_problems(self)
        if problems:
            raise ValidationError.from_exception_data("JobSpec", [
                InitErrorDetails(type=PydanticCustomError("regions", "{problem}", {"problem": text}),
                                 loc=loc, input=value)
                for loc, text, value in problems
            ])
        return self

    # -- derived values ------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.registry.model_name or self.job

    @property
    def experiment_name(self) -> str:
        return self.registry.experiment or f"airfed/{self.job}"

    @property
    def max_rounds(self) -> int:
        """Most rounds one trigger may ask for (each round is one DAG run of the chain)."""
        return self.max_rounds_per_run or self.rounds_per_run

    def canonical_json(self) -> str:
        data = self.model_dump(mode="json")
        if not self.regions:  # a flat job hashes as it did before regions existed
            data.pop("regions"), data.pop("across_regions")
            for silo in data["silos"]:
                silo.pop("region")
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def spec_hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def step_payload(self) -> str:
        """The spec as a step receives it (``AIRFED_SPEC``): its canonical JSON. The step validates it
        again with :meth:`from_step_payload` and derives names and hash from the model."""
        return self.canonical_json()

    @classmethod
    def from_step_payload(cls, raw: str) -> JobSpec:
        """The validated spec from :meth:`step_payload`'s JSON (underscore keys of older Airflow sides,
        which sent derived names along, are ignored: the model derives them)."""
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("the job spec payload must be a JSON object")
        return cls.model_validate({k: v for k, v in data.items() if not k.startswith("_")}, context={"in_step": True})


def region_problems(spec: JobSpec) -> list[tuple[tuple[str | int, ...], str, Any]]:
    """What is undefined or inconsistent in the spec's regional tier: (field location, message, value)."""
    problems: list[tuple[tuple[str | int, ...], str, Any]] = []
    names = list(dict.fromkeys(r.name for r in spec.regions))
    if not spec.regions:
        for i, silo in enumerate(spec.silos):
            if silo.region is not None:
                problems.append((("silos", i, "region"), "the job defines no 'regions'; add the region or drop "
                                 "this field", silo.region))
        if spec.across_regions is not None:
            problems.append((("across_regions",), "'across_regions' needs 'regions'", None))
        return problems
    for i, region in enumerate(spec.regions):
        if region.name in [r.name for r in spec.regions[:i]]:
            problems.append((("regions", i, "name"), f"duplicate region name {region.name!r}", region.name))
    members: dict[str, int] = dict.fromkeys(names, 0)
    for i, silo in enumerate(spec.silos):
        if silo.region is None:
            problems.append((("silos", i, "region"), f"silo {silo.name!r} needs a region (one of "
                             f"{', '.join(names)}) since the job defines 'regions'", None))
        elif silo.region not in members:
            problems.append((("silos", i, "region"), f"unknown region {silo.region!r}; expected one of "
                             f"{', '.join(names)}", silo.region))
        else:
            members[silo.region] += 1
    params = spec.strategy.parameters()
    for i, region in enumerate(spec.regions):
        count = members.get(region.name, 0)
        if count == 0:
            problems.append((("regions", i, "name"), f"region {region.name!r} has no silos", region.name))
            continue
        if region.quorum.min_silos > count:
            problems.append((("regions", i, "quorum", "min_silos"), f"larger than the region's {count} silo(s)",
                             region.quorum.min_silos))
        if spec.strategy.name not in EXACT_REGION_STRATEGIES:
            try:
                params.check_silo_count(count)
            except ValueError as exc:
                problems.append((("regions", i, "name"), f"{spec.strategy.name} runs per region: {exc}",
                                 region.name))
    across = spec.across_regions or AcrossRegions()
    if across.min_regions > len(spec.regions):
        problems.append((("across_regions", "min_regions"), f"larger than the number of regions "
                         f"({len(spec.regions)})", across.min_regions))
    exact = spec.strategy.name in EXACT_REGION_STRATEGIES
    if exact and across.rule is not None:
        problems.append((("across_regions", "rule"), f"{spec.strategy.name} combines regional partials exactly "
                         "(weighted sums and example totals); a rule across regions is not defined for it: omit "
                         "'rule'", across.rule))
    if not exact and across.rule is None:
        problems.append((("across_regions", "rule"), f"{spec.strategy.name} does not compose across regions "
                         f"exactly: name how its regional aggregates combine ({' or '.join(ACROSS_REGION_RULES)})",
                         None))
    problems += _store_secret_problems(spec)
    return problems


def _store_secret_problems(spec: JobSpec) -> list[tuple[tuple[str | int, ...], str, Any]]:
    """Residency: a region's store credentials appear nowhere but in that region's own pods."""
    owner: dict[str, str] = {}
    problems: list[tuple[tuple[str | int, ...], str, Any]] = []
    for i, region in enumerate(spec.regions):
        for j, ref in enumerate(region.store_secrets):
            if owner.setdefault(ref.secret, region.name) != region.name:
                problems.append((("regions", i, "store_secrets", j, "secret"), f"Secret {ref.secret!r} is "
                                 f"already the store credential of region {owner[ref.secret]!r}", ref.secret))
    if not owner:
        return problems
    for j, ref in enumerate(spec.placement.secrets):
        if ref.secret in owner:
            problems.append((("placement", "secrets", j, "secret"), f"Secret {ref.secret!r} is region "
                             f"{owner[ref.secret]!r}'s store credential; global steps may not hold it", ref.secret))
    for i, region in enumerate(spec.regions):
        for j, ref in enumerate(region.placement.secrets):
            if owner.get(ref.secret, region.name) != region.name:
                problems.append((("regions", i, "placement", "secrets", j, "secret"), f"Secret {ref.secret!r} is "
                                 f"region {owner[ref.secret]!r}'s store credential", ref.secret))
    for i, silo in enumerate(spec.silos):
        for j, ref in enumerate(silo.placement.secrets):
            if owner.get(ref.secret, silo.region) != silo.region:
                problems.append((("silos", i, "placement", "secrets", j, "secret"), f"Secret {ref.secret!r} is "
                                 f"region {owner[ref.secret]!r}'s store credential; silo {silo.name!r} is in "
                                 f"region {silo.region!r}", ref.secret))
    return problems


def json_schema() -> dict[str, Any]:
    schema = JobSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "airfed job spec"
    return schema
