"""Job spec validation: every problem reported as file:line: field.path: message."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml
from airfed.cli import main as airfed_main
from airfed.spec import SpecError, load_spec
from helpers import REPO

GOOD = textwrap.dedent(
    """\
    job: tiny
    schedule: "0 3 * * *"
    client_app: examples.digits.client_app:app
    model:
      init: examples.digits.model:initial_state
    silos:
      - name: a
        data: /tmp/a.npz
      - name: b
        data: /tmp/b.npz
    """
)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return [str(p) for p in info.value.problems]


def test_example_spec_is_valid():
    spec = load_spec(REPO / "dags" / "digits.yaml")
    assert [s.name for s in spec.silos] == ["us", "eu", "asia"]
    assert spec.client_app == "examples.digits.client_app:app"
    assert len(spec.spec_hash()) == 64


def test_four_problems_one_line_each_with_field_and_line(tmp_path, capsys):
    bad = write(
        tmp_path,
        "bad.yaml",
        textwrap.dedent(
            """\
            job: tiny
            schedule: "every night"
            colour: blue
            model:
              init: examples.digits.model:initial_state
            silos:
              - name: a
                data: /tmp/a.npz
              - name: a
                data: /tmp/b.npz
            """
        ),
    )
    lines = problems_of(bad)
    assert len(lines) == 4, lines
    text = "\n".join(lines)
    assert f"{bad}:3: colour: unknown field" in text
    assert f"{bad}:2: schedule: 'every night' is not a valid cron expression" in text
    assert f"{bad}:6: silos: duplicate silo name 'a'" in text
    assert f"{bad}:1: client_app: required field is missing" in text

    assert airfed_main(["validate", str(bad)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert sorted(out) == sorted(lines)


def test_valid_spec_exits_zero(tmp_path):
    assert airfed_main(["validate", "-q", str(write(tmp_path, "ok.yaml", GOOD))]) == 0


@pytest.mark.parametrize(
    ("patch", "field", "message"),
    [
        ("client_app: not-a-ref", "client_app", "is not a 'module:attribute' reference"),
        ("rounds_per_run: -2", "rounds_per_run", "greater than or equal to 1"),
        ("strategy: {name: FedMagic}", "strategy.name", "unknown strategy 'FedMagic'"),
        ("strategy: {name: FedAvg, params: {eta: 0.1}}", "strategy.params.eta",
         "unknown parameter for FedAvg; accepted: none"),
        ("strategy: {name: FedTrimmedAvg, params: {beta: 0.7}}", "strategy.params.beta",
         "less than 0.5 (got 0.7; see Flower's FedTrimmedAvg)"),
        ("strategy: {name: Krum, params: {num_malicious_nodes: -1}}", "strategy.params.num_malicious_nodes",
         "greater than or equal to 0 (got -1"),
        ("quorum: {min_silos: 5}", "<spec>", "quorum.min_silos=5 is larger than the number of silos (2)"),
        ("env: {AWS_SECRET_ACCESS_KEY: hunter2}", "env", "looks like a credential"),
        ("silos: []", "silos", "at least 1 item"),
        ("model: {init: a.b:c, seed: /x.safetensors}", "model", "exactly one of"),
        ("runner: kubernetes", "<spec>", "runner 'kubernetes' needs 'image'"),
        ("job: Has Spaces", "job", "should match pattern"),
        ("job: 42", "job", "valid string"),
        ("schedule: '61 * * * *'", "schedule", "not a valid cron expression"),
        ("schedule: '@sometimes'", "schedule", "not a valid cron expression"),
        ("rounds_per_run: many", "rounds_per_run", "valid integer"),
        ("rounds_per_run: 0", "rounds_per_run", "greater than or equal to 1"),
        ("rounds_per_run: 1000", "rounds_per_run", "less than or equal to 100"),
        ("max_rounds_per_run: 0", "max_rounds_per_run", "greater than or equal to 1"),
        ("client_app: examples.digits.client_app", "client_app", "is not a 'module:attribute' reference"),
        ("client_app: 'os:system; rm'", "client_app", "is not a 'module:attribute' reference"),
        ("model: {init: 'not a ref'}", "model.init", "is not a 'module:attribute' reference"),
        ("model: {}", "model", "exactly one of"),
        ("model: {init: a.b:c, weights: x}", "model.weights", "unknown field"),
        ("strategy: {name: fedavg}", "strategy.name", "unknown strategy 'fedavg'"),
        ("strategy: {name: FedProx, params: {proximal_mu: fast}}", "strategy.params.proximal_mu",
         "valid number (got 'fast'"),
        ("quorum: {min_silos: 0}", "quorum.min_silos", "greater than or equal to 1"),
        ("quorum: {min_fraction: 1.5}", "quorum.min_fraction", "less than or equal to 1"),
        ("quorum: {min_slios: 1}", "quorum.min_slios", "unknown field"),
        ("guards: {max_update_norm: -1}", "guards.max_update_norm", "greater than 0"),
        ("training: {lr: [0.1, 0.2]}", "training.lr", "must be a number, boolean or string"),
        ("promotion: {metric: accuracy, direction: up}", "promotion.direction", "'maximize' or 'minimize'"),
        ("runner: docker", "runner", "'local' or 'kubernetes'"),
        ("silos: {name: a}", "silos", "valid list"),
        ("silos: [{name: a}]", "silos[0].data", "required field is missing"),
        ("silos: [{name: UPPER, data: x}]", "silos[0].name", "should match pattern"),
        ("silos: [{name: a, data: x, placement: {namespace: Bad_NS}}]", "silos[0].placement.namespace", "pattern"),
        ("silos: [{name: a, data: x, placement: {secrets: [{secret: s3, value: hunter2}]}}]",
         "silos[0].placement.secrets[0].value", "unknown field"),
        ("silos: [{name: a, data: x, env: {DB_PASSWORD: hunter2}}]", "silos[0].env", "looks like a credential"),
        ("silos: [{name: a, data: x, placement: {secrets: [{secret: s3, env: AWS_KEY}]}}]",
         "silos[0].placement.secrets[0]", "'env' needs 'key'"),
        ("execution: {retries: -1}", "execution.retries", "greater than or equal to 0"),
        ("execution: {silo_timeout_seconds: 0}", "execution.silo_timeout_seconds", "greater than or equal to 1"),
        ("differential_privacy: {mode: server, noise_multiplier: 1.0}",
         "differential_privacy.clipping_norm", "required field is missing"),
        ("differential_privacy: {mode: both, noise_multiplier: 1.0, clipping_norm: 1.0}",
         "differential_privacy.mode", "'server' or 'client'"),
        ("data: {prepare: nope}", "data.prepare", "is not a 'module:attribute' reference"),
    ],
)
def test_single_problem_names_the_field(tmp_path, patch, field, message):
    data = yaml.safe_load(GOOD)
    data.update(yaml.safe_load(patch))
    path = write(tmp_path, "case.yaml", yaml.safe_dump(data, sort_keys=False))
    lines = problems_of(path)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{path}:")
    assert f": {field}: " in lines[0] and message in lines[0], lines[0]


def test_yaml_syntax_error_has_line(tmp_path):
    path = write(tmp_path, "broken.yaml", "job: tiny\nsilos: [\n  - name: a\n")
    (line,) = problems_of(path)
    assert line.startswith(f"{path}:") and "invalid YAML" in line


def test_yaml_tags_are_not_constructed(tmp_path):
    path = write(tmp_path, "tag.yaml", GOOD + "description: !!python/object/apply:os.system ['true']\n")
    (line,) = problems_of(path)
    assert "invalid YAML" in line


def test_duplicate_yaml_key_is_reported(tmp_path):
    path = write(tmp_path, "dup.yaml", GOOD + "job: other\n")
    assert any(": job: duplicate key" in line for line in problems_of(path))


def test_schema_is_exported_from_the_models(capsys):
    assert airfed_main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["additionalProperties"] is False
    assert {"job", "client_app", "model", "silos"} <= set(schema["required"])
    assert "strategy" in schema["properties"]
