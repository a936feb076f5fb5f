"""Settings: defaults, layering (defaults < YAML < env < overrides), errors and masking."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.config import Settings, load_settings
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PIPELINE_* variable of the surrounding shell may leak into these tests."""
    for name in list(os.environ):
        if name.startswith("PIPELINE_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    s = load_settings()
    assert s.kafka.bootstrap_servers is None
    assert s.kafka.input_topic == "ticks"
    assert s.kafka.output_topic == "forecasts"
    assert s.kafka.dlq_topic == "ticks.dlq"
    assert s.kafka.group_id == "pipeline"
    assert s.metrics.port == 9108
    assert s.model.path is None
    assert s.kafka.sasl_password is None
    assert s == Settings()


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "")) == Settings()
    assert load_settings(write(tmp_path, "# only a comment\n")) == Settings()


def test_layering(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path,
        "kafka:\n"
        "  input_topic: in-from-file\n"
        "  group_id: group-from-file\n"
        "  partitions: 3\n"
        "  bootstrap_servers: file:9092\n"
        "metrics:\n"
        "  port: 1000\n"
        "log_level: DEBUG\n",
    )
    # YAML over defaults.
    s = load_settings(path)
    assert (s.kafka.input_topic, s.kafka.group_id, s.kafka.partitions) == (
        "in-from-file",
        "group-from-file",
        3,
    )
    assert s.kafka.output_topic == "forecasts"  # untouched default
    assert s.metrics.port == 1000
    assert s.log_level == "DEBUG"

    # Environment over YAML; a sibling field set only in YAML survives (deep merge).
    monkeypatch.setenv("PIPELINE_KAFKA__GROUP_ID", "group-from-env")
    monkeypatch.setenv("PIPELINE_KAFKA__BOOTSTRAP_SERVERS", "env:9092")
    monkeypatch.setenv("PIPELINE_METRICS__PORT", "2000")
    s = load_settings(path)
    assert s.kafka.group_id == "group-from-env"
    assert s.kafka.bootstrap_servers == "env:9092"
    assert s.metrics.port == 2000
    assert s.kafka.input_topic == "in-from-file"
    assert s.kafka.partitions == 3

    # Overrides over environment; None leaves do not shadow lower layers.
    s = load_settings(
        path,
        overrides={
            "kafka": {"group_id": "group-from-cli", "partitions": None, "bootstrap_servers": None},
            "metrics": {"port": None},
        },
    )
    assert s.kafka.group_id == "group-from-cli"
    assert s.kafka.partitions == 3
    assert s.kafka.bootstrap_servers == "env:9092"
    assert s.metrics.port == 2000
    assert s.kafka.input_topic == "in-from-file"


def test_env_without_file_and_override_without_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_KAFKA__PARTITIONS", "12")
    monkeypatch.setenv("PIPELINE_SAMPLE_FEED__ENABLED", "false")
    s = load_settings()
    assert s.kafka.partitions == 12
    assert s.sample_feed.enabled is False
    assert load_settings(overrides={"kafka": {"partitions": 7}}).kafka.partitions == 7
    monkeypatch.setenv("PIPELINE_LOG_LEVEL", "WARNING")  # a top-level field: no section
    assert load_settings().log_level == "WARNING"


def test_unknown_key_in_yaml_names_the_dotted_field(tmp_path: Path) -> None:
    path = write(tmp_path, "kafka:\n  input_topik: x\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "kafka.input_topik" in str(info.value)
    assert info.value.field == "kafka.input_topik"
    assert "input_topic" in str(info.value)  # lists the known fields


def test_unknown_section_in_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, "kafak:\n  group_id: x\n"))
    assert "kafak" in str(info.value)


def test_wrong_type_in_yaml_names_field_and_env_var(tmp_path: Path) -> None:
    path = write(tmp_path, 'kafka:\n  partitions: "many"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    msg = str(info.value)
    assert "kafka.partitions" in msg
    assert "PIPELINE_KAFKA__PARTITIONS" in msg
    assert "many" in msg
    assert str(path) in msg  # says which layer the value came from
    assert info.value.field == "kafka.partitions"


def test_wrong_type_in_env_names_field_and_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_KAFKA__PARTITIONS", "many")
    with pytest.raises(ConfigError) as info:
        load_settings()
    msg = str(info.value)
    assert "kafka.partitions" in msg
    assert "PIPELINE_KAFKA__PARTITIONS" in msg
    assert "environment" in msg


def test_out_of_range_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, "metrics:\n  port: 70000\n"))
    assert "metrics.port" in str(info.value)


def test_invalid_yaml_mentions_the_line(tmp_path: Path) -> None:
    path = write(
        tmp_path, "kafka:\n  group_id: ok\n  input_topic: [unclosed\nmetrics:\n  port: 1\n"
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    msg = str(info.value)
    assert "line" in msg
    assert any(f"line {n}" in msg for n in range(3, 7))
    assert str(path) in msg


def test_yaml_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_settings(write(tmp_path, "- a\n- b\n"))


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value)


def test_unknown_env_section(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_NOPE__X", "1")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "PIPELINE_NOPE__X" in str(info.value)


def test_unknown_env_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_KAFKA__NOPE", "1")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "kafka.nope" in str(info.value)


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(ValidationError):
        s.kafka.group_id = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        s.log_level = "DEBUG"  # type: ignore[misc]
    assert s.kafka.group_id == "pipeline"


def test_secrets_are_masked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "hunter2-s3cret"
    for s in (
        load_settings(overrides={"kafka": {"sasl_password": secret, "sasl_username": "bob"}}),
        load_settings(write(tmp_path, f"kafka:\n  sasl_password: {secret}\n")),
    ):
        assert s.kafka.sasl_password is not None
        assert s.kafka.sasl_password.get_secret_value() == secret
        masked = s.masked()
        assert masked["kafka"]["sasl_password"] not in (None, secret)
        dumped = json.dumps(masked)
        assert secret not in dumped
        assert secret not in repr(s) and secret not in str(s)
        assert masked["kafka"]["input_topic"] == "ticks"  # non-secrets stay readable
    monkeypatch.setenv("PIPELINE_KAFKA__SASL_PASSWORD", secret)
    assert secret not in json.dumps(load_settings().masked())


def test_fingerprint_is_stable_and_sensitive() -> None:
    a, b = load_settings(), load_settings()
    assert a.fingerprint() == b.fingerprint()
    c = load_settings(overrides={"kafka": {"group_id": "other"}})
    assert a.fingerprint() != c.fingerprint()


def test_shipped_config_file_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    s = load_settings(Path("config/pipeline.yaml"))
    assert isinstance(s, Settings)


def test_a_client_that_is_not_installed_names_the_field_and_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "confluent_kafka" else real(name)
    )
    monkeypatch.setenv("PIPELINE_KAFKA__CLIENT", "confluent-kafka")
    with pytest.raises(ConfigError, match=r"pipeline\[librdkafka\]") as err:
        load_settings()
    assert err.value.field == "kafka.client" and "environment" in str(err.value)
    monkeypatch.setenv("PIPELINE_KAFKA__CLIENT", "kafka-python")
    assert load_settings().kafka.client == "kafka-python"


def test_cooperative_assignment_with_kafka_python_is_refused_with_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PIPELINE_KAFKA__ASSIGNOR", "cooperative-sticky")
    with pytest.raises(ConfigError, match=r"confluent-kafka.*range") as err:
        load_settings()
    assert err.value.field == "kafka.assignor" and "environment" in str(err.value)
    monkeypatch.setenv("PIPELINE_KAFKA__CLIENT", "confluent-kafka")
    assert load_settings().kafka.assignor == "cooperative-sticky"
