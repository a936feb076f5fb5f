"""Typed settings (pydantic).

Layers: defaults < YAML file < ``PIPELINE_<SECTION>__<FIELD>`` environment < CLI flags.

One frozen :class:`Settings` object is built at start-up by :func:`load_settings` and passed down;
no module reads the environment on its own. Validation errors become :class:`ConfigError` naming
the dotted field and the ways to set it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from pipeline.combine import CombineConfig
from pipeline.errors import ConfigError

ENV_PREFIX = "PIPELINE_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSettings(_Section):
    """Where ticks come from and forecasts go."""

    # None: start the embedded Tansu broker and use it.
    bootstrap_servers: str | None = None
    # The Kafka client library. kafka-python (pure Python) is the default; confluent-kafka
    # (librdkafka, ~5x the records per core) is an extra: pip install 'pipeline[librdkafka]'.
    client: Literal["kafka-python", "confluent-kafka"] = "kafka-python"
    # How the group hands out partitions. range / roundrobin (eager): every member gives up
    # everything and restores it from the changelog at each rebalance; cooperative-sticky
    # (incremental): only partitions that change owner are revoked, the others keep streaming
    # and keep their state. All members of a group must agree (decisions.md #25).
    assignor: Literal["range", "roundrobin", "cooperative-sticky"] = "range"
    input_topic: str = "ticks"
    output_topic: str = "forecasts"
    dlq_topic: str = "ticks.dlq"
    group_id: str = "pipeline"
    client_id: str = "pipeline"
    # exactly_once: forecasts, changelog and offsets of a micro-batch in one transaction (falls
    # back to at_least_once, and says so, if the broker refuses transactions).
    processing_guarantee: Literal["exactly_once", "at_least_once"] = "exactly_once"
    # Names this instance's transactional id (<group_id>-<instance_id>); stable across restarts
    # of the same instance so a zombie gets fenced. Default: the host name.
    instance_id: str | None = None
    # A transaction commit that takes longer is abandoned, the producer rebuilt and the batch
    # redone from the committed offsets (Tansu's commit can hang after a broker restart).
    transaction_timeout_ms: int = Field(default=30_000, ge=1_000)
    # Topics missing at start-up are created with this many partitions (input, output, DLQ).
    create_topics: bool = True
    partitions: int = Field(default=6, ge=1, le=10_000)
    replication_factor: int = Field(default=1, ge=1)
    # Consumer-group timing. Tansu holds a join for ~session_timeout/2: keep it small there.
    session_timeout_ms: int = Field(default=10_000, ge=1_000)
    heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    max_poll_interval_ms: int = Field(default=300_000, ge=1_000)
    # Rejoin watchdog: partitions revoked (or never assigned) and no new assignment for this long
    # -> the consumer is closed and created again. Tansu sometimes never answers a rejoin after a
    # restart; on Apache Kafka a rebalance waits for slow members up to max_poll_interval_ms, so
    # raise this toward it if members process long batches (decisions.md #12).
    rejoin_timeout_ms: int = Field(default=120_000, ge=1_000)
    # The broker long-polls at most this long; below ~100 ms Tansu's fetch loop degrades.
    fetch_max_wait_ms: int = Field(default=100, ge=0)
    # Upper bound of one micro-batch (one poll).
    max_poll_records: int = Field(default=5_000, ge=1)
    # Commit cadence: a transaction (exactly-once) or an offset commit (at-least-once) covers
    # the micro-batches of up to this many milliseconds or input records, whichever comes
    # first (0 ms: one per poll). Under exactly-once, forecasts become visible to
    # read_committed consumers at the commit, so this bounds the latency it adds.
    commit_interval_ms: int = Field(default=100, ge=0)
    commit_records: int = Field(default=10_000, ge=1)
    # ... and while the daemon is caught up (its last poll read every partition it touched to
    # the high watermark), as soon as this many records are in: a steady feed's forecasts are
    # not held back for the interval, a backlog still commits at most once per interval
    # (decisions.md 34). Set it to commit_records to turn the rule off.
    commit_records_caught_up: int = Field(default=125, ge=1)
    # Exactly-once: a cadence commit runs on a background thread while the next records are
    # polled and decoded (decisions.md 41); false: the loop waits for each commit.
    commit_in_background: bool = True
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    linger_ms: int = Field(default=5, ge=0)
    # Producer batch size per partition. kafka-python's 16 KiB default splits one poll's
    # forecasts (~550 B each) into hundreds of requests; 256 KiB measured +30% throughput.
    batch_size: int = Field(default=256 * 1024, ge=1024)
    compression_type: Literal["none", "gzip", "lz4"] = "none"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None


class StateSettings(_Section):
    """Per-stream state: the changelog topic, eviction and the stream cap."""

    # Changelog topic (compacted, co-partitioned with the input); None: "<group_id>.state".
    changelog: bool = True
    topic: str | None = None
    # Evict streams idle longer than this many seconds (None: never), measured on the clock below.
    ttl_seconds: float | None = Field(default=None, gt=0)
    ttl_clock: Literal["wall", "event"] = "wall"
    # Evict the least recently seen streams beyond this many (None: no cap).
    max_streams: int | None = Field(default=None, ge=1)
    evict_interval_seconds: float = Field(default=5.0, gt=0)


class MetricsSettings(_Section):
    """The Prometheus endpoint (``/metrics``); port 0 disables it."""

    host: str = "0.0.0.0"
    port: int = Field(default=9108, ge=0, le=65_535)


class ModelSettings(_Section):
    """Which model serves, and how many CPU threads torch may use."""

    # None: the default model shipped inside the package.
    path: Path | None = None
    # Reload the model when its file changes (also on SIGHUP); checked this often (0: never).
    watch_seconds: float = Field(default=5.0, ge=0)
    # 1 by default: with more, torch's OpenMP workers spin against the Kafka client threads and
    # anything else on the host; measured 10x slower on a busy 2-core machine (decisions.md #7).
    torch_threads: int = Field(default=1, ge=1)


class InputSettings(_Section):
    """How input records are judged."""

    # Larger values go to the dead-letter topic as `too_large` (the producer's own limit is 1 MiB).
    max_record_bytes: int = Field(default=64 * 1024, ge=64)
    # A tick older than its stream's newest tick: dead_letter (reason `late`), drop (counted in
    # pipeline_records_total{outcome="dropped"}) or accept (forecast; its dt input counts as 0).
    late_policy: Literal["dead_letter", "drop", "accept"] = "dead_letter"


class ForecastSettings(_Section):
    """How the served forecast is made from the model (``pipeline/combine.py``): mixed per stream
    with cheap members by their recent errors, with calibrated interval bounds."""

    # False: serve the network's forecast alone, without lower/upper bounds (the engine's
    # fastest path; the combination costs about a third of the engine's throughput, README).
    combine: bool = True
    # Members mixed with the model: any of model, persistence, damped, trend, seasonal,
    # seasonal_change. [model] alone serves the network's forecast unchanged (intervals still
    # come with it).
    members: tuple[
        Literal["model", "persistence", "damped", "trend", "seasonal", "seasonal_change"], ...
    ] = ("model", "persistence", "damped", "trend", "seasonal", "seasonal_change")
    # Season of the two seasonal members, in ticks (24 for hourly data with a daily cycle);
    # 0: neither.
    season: int = Field(default=0, ge=0, le=10_000)
    damping: float = Field(default=0.5, ge=0, le=1, description="phi of the damped member")
    # Step of the members' log-weights on the mix's error at step 1 (steps further ahead: less,
    # eta / r^0.75 for a group judged at step r); 0: equal weights.
    eta: float = Field(default=0.03, ge=0, le=10)
    # Central coverage of the [lower, upper] bounds, and the step of their online calibration.
    interval_level: float = Field(default=0.8, gt=0, lt=1)
    interval_rate: float = Field(default=0.05, gt=0, le=1)

    def combine_config(self) -> CombineConfig:
        return CombineConfig(
            members=tuple(self.members),
            season=self.season,
            damping=self.damping,
            eta=self.eta,
            level=self.interval_level,
            rate=self.interval_rate,
        )


class SampleFeedSettings(_Section):
    """Synthetic ticks produced into the input topic by ``pipeline run`` itself (demo mode)."""

    # None: on exactly when the embedded broker is used.
    enabled: bool | None = None
    streams: int = Field(default=20, ge=1)
    rate: float = Field(default=200.0, gt=0, description="ticks per second, all streams together")
    seed: int = 0


class Settings(_Section):
    """Every setting of the daemon. Frozen: build a new one instead of mutating."""

    kafka: KafkaSettings = KafkaSettings()
    metrics: MetricsSettings = MetricsSettings()
    model: ModelSettings = ModelSettings()
    input: InputSettings = InputSettings()
    forecast: ForecastSettings = ForecastSettings()
    state: StateSettings = StateSettings()
    sample_feed: SampleFeedSettings = SampleFeedSettings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def masked(self) -> dict[str, Any]:
        """The settings as plain data with secrets masked, for the start-up log line."""
        data: dict[str, Any] = json.loads(self.model_dump_json())
        return data

    def changelog_topic(self) -> str:
        return self.state.topic or f"{self.kafka.group_id}.state"

    def fingerprint(self) -> str:
        """A short stable hash of the settings (exported in the info metric)."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path}:{where} is not valid YAML; fix the syntax") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    return data


def _read_env() -> dict[str, Any]:
    out: dict[str, Any] = {}
    sections = set(Settings.model_fields)
    for name, value in os.environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        if len(path) == 1 and path[0] not in sections:
            # Not a setting: e.g. Kubernetes' service links (PIPELINE_SERVICE_HOST, PIPELINE_PORT).
            continue
        if path[0] not in sections:
            raise ConfigError(
                f"environment variable {name}: unknown section {path[0]!r}; "
                f"known sections: {', '.join(sorted(sections))}",
                field=path[0],
            )
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _parse_env_value(value)
    return out


def _parse_env_value(value: str) -> Any:
    # Env values are strings; pydantic coerces "6" to int, and JSON handles lists/mappings/null.
    if value.strip().startswith(("{", "[")) or value in ("null", "true", "false"):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _describe(error: dict[str, Any], sources: dict[str, str]) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    env = ENV_PREFIX + "__".join(str(p).upper() for p in error["loc"])
    got = error.get("input")
    msg = error["msg"]
    if error["type"] == "extra_forbidden":
        section = str(error["loc"][0])
        known = _known_fields(error["loc"][:-1])
        hint = f"known here: {', '.join(known)}" if known else f"check the spelling of {section!r}"
        return f"unknown setting {loc!r} ({sources.get(loc, 'config')}); {hint}"
    return (
        f"setting {loc!r} = {got!r} ({sources.get(loc, 'config')}): {msg}; "
        f"fix it in the YAML file, {env}, or the matching CLI flag"
    )


def _known_fields(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Settings
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return []
        if not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def load_settings(
    config_file: Path | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Build the settings: defaults < ``config_file`` < ``PIPELINE_*`` env < ``overrides``.

    ``overrides`` is a nested dict of CLI values (``{"kafka": {"group_id": "x"}}``); ``None``
    leaves are ignored so unset flags do not shadow lower layers.
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    if config_file is not None:
        layers.append((f"file {config_file}", _read_yaml(Path(config_file))))
    layers.append(("environment", _read_env()))
    layers.append(("command line", _drop_none(overrides or {})))
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, layer in layers:
        merged = _deep_merge(merged, layer)
        sources.update(dict.fromkeys(_flatten(layer), name))
    try:
        settings = Settings(**merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ConfigError(_describe(dict(first), sources), field=loc) from exc
    _require_client(settings.kafka, sources)
    return settings


def _require_client(kafka: KafkaSettings, sources: dict[str, str]) -> None:
    """ConfigError naming the field and the fix if the chosen client is not installed, or
    cannot run the chosen assignor."""
    if kafka.client == "confluent-kafka" and importlib.util.find_spec("confluent_kafka") is None:
        raise ConfigError(
            f"kafka.client (from {sources.get('kafka.client', 'default')}) is confluent-kafka, "
            "which is not installed: pip install 'pipeline[librdkafka]', or set "
            "kafka.client: kafka-python",
            field="kafka.client",
        )
    if kafka.client == "kafka-python" and kafka.assignor == "cooperative-sticky":
        # decisions.md #25: no callback for an empty assignment, and rebalances that did not
        # settle on the test broker.
        raise ConfigError(
            f"kafka.assignor (from {sources.get('kafka.assignor', 'default')}) is "
            "cooperative-sticky, which kafka-python does not run reliably: set kafka.client: "
            "confluent-kafka, or kafka.assignor: range",
            field="kafka.assignor",
        )


def _drop_none(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            inner = _drop_none(value)
            if inner:
                out[key] = inner
        elif value is not None:
            out[key] = value
    return out
