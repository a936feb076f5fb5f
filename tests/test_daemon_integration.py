"""The daemon end to end on a real broker (Tansu fixture or KAFKA_BOOTSTRAP_SERVERS)."""

from __future__ import annotations

import json
import math
import random
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.cli import main as cli_main
from pipeline.embedded import free_port
from tests.kafka_helpers import DaemonProcess, create_topics, produce, read_topic, unique

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("kafka_client")]

T0 = 1_700_000_000.0


def _topics(bootstrap: str, partitions: int) -> tuple[str, str, str, str]:
    names = unique("ticks"), unique("forecasts"), unique("dlq"), unique("group")
    create_topics(bootstrap, names[:3], partitions)
    return names


def _daemon_args(bootstrap: str, names: tuple[str, str, str, str], port: int = 0) -> list[str]:
    inp, out, dlq, group = names
    return [
        "--bootstrap-servers", bootstrap, "--input-topic", inp, "--output-topic", out,
        "--dlq-topic", dlq, "--group-id", group, "--metrics-port", str(port), "--no-sample-feed",
    ]  # fmt: skip


def _tick(ts: float, value: float) -> bytes:
    return json.dumps({"ts": ts, "value": value}).encode()


def _scaled_streams(
    n_streams: int, n_ticks: int
) -> tuple[list[tuple[bytes, bytes]], dict[str, float]]:
    """Interleaved ticks of streams near 1e-3 and near 1e5; returns records and each scale."""
    rng = random.Random(7)
    scales = {f"s{i:03d}": (1e-3 if i % 2 else 1e5) * rng.uniform(0.5, 2) for i in range(n_streams)}
    records = []
    for t in range(n_ticks):
        for stream, scale in scales.items():
            value = scale * (1 + 0.1 * math.sin(t / 5 + len(stream)) + 0.01 * rng.gauss(0, 1))
            records.append((stream.encode(), _tick(T0 + 60 * t, value)))
    return records, scales


BAD_RECORDS: list[tuple[bytes | None, bytes | None, str]] = [
    (b"s000", b"{not json", "invalid_json"),
    (b"s001", b"[1, 2, 3]", "not_an_object"),
    (None, json.dumps({"ts": T0, "value": 1.0}).encode(), "missing_stream"),
    (b"s002", json.dumps({"value": 1.0}).encode(), "missing_field"),
    (b"s003", json.dumps({"ts": T0, "value": "12.5"}).encode(), "bad_type"),
    (b"s004", b'{"ts": 1700000000, "value": NaN}', "non_finite"),
    (b"s005", json.dumps({"ts": "yesterday", "value": 1.0}).encode(), "bad_timestamp"),
]


def _metrics(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def test_every_tick_gets_one_forecast_and_bad_records_are_dead_lettered(
    bootstrap: str, start_daemon: Callable[..., DaemonProcess]
) -> None:
    names = _topics(bootstrap, partitions=4)
    inp, out, dlq, _ = names
    good, scales = _scaled_streams(n_streams=60, n_ticks=30)
    # Bad records sit among the good ones: the daemon must carry on past each of them.
    records: list[tuple[bytes | None, bytes | None]] = list(good)
    for i, (key, value, _) in enumerate(BAD_RECORDS):
        records.insert(300 * (i + 1), (key, value))
    produce(bootstrap, inp, records)

    port = free_port()
    daemon = start_daemon(_daemon_args(bootstrap, names, port))
    forecasts = read_topic(bootstrap, out, len(good), timeout_s=90)
    dead = read_topic(bootstrap, dlq, len(BAD_RECORDS), timeout_s=30)

    # Exactly one forecast per good tick; per stream seq = 1..n in order; own units.
    assert len(forecasts) == len(good)
    by_stream: dict[str, list[dict]] = defaultdict(list)
    for rec in forecasts:
        doc = rec.json()
        assert rec.key == doc["stream"].encode()
        by_stream[doc["stream"]].append(doc)
    assert set(by_stream) == set(scales)
    for stream, docs in by_stream.items():
        assert [d["seq"] for d in docs] == list(range(1, 31)), stream
        assert [d["ts"] for d in docs] == [T0 + 60 * t for t in range(30)]
        for d in docs:
            assert len(d["forecast"]) >= 1 and d["model"]
            ratio = d["forecast"][0] / scales[stream]
            assert 0.3 < ratio < 3.0, (stream, d)  # 1e-3 streams stay ~1e-3, 1e5 ~1e5

    # Every bad record is in the DLQ with its reason, source coordinates and original bytes.
    assert len(dead) == len(BAD_RECORDS)
    inputs = {(r.partition, r.offset): r for r in read_topic(bootstrap, inp, len(records))}
    expected = {value: reason for _, value, reason in BAD_RECORDS}
    for rec in dead:
        assert rec.headers["error"].decode() == expected[rec.value]
        assert rec.headers["error.detail"]
        assert rec.headers["source.topic"].decode() == inp
        source = inputs[(int(rec.headers["source.partition"]), int(rec.headers["source.offset"]))]
        assert (source.key, source.value) == (rec.key, rec.value)

    # /metrics parses; the end-to-end histogram counts every forecast.
    m = _wait_metrics(port, len(good))
    assert m["pipeline_end_to_end_latency_seconds_count{}"] == len(good)
    assert m[f"pipeline_forecasts_emitted_total{{topic={out}}}"] == len(good)
    assert m[f"pipeline_ticks_consumed_total{{topic={inp}}}"] == len(records)
    for _, _, reason in BAD_RECORDS:
        assert m[f"pipeline_dead_letters_total{{reason={reason}}}"] == 1
    assert m["pipeline_active_streams{}"] == 60
    assert any(k.startswith("pipeline_consumer_lag_records{") for k in m)
    assert any(k.startswith("pipeline_model_info{") for k in m)
    assert m["pipeline_batch_processing_seconds_count{}"] >= 1
    # Ticks 21..30 of each stream are warm and score the previous one-step forecast.
    assert m["pipeline_forecasts_scored_total{}"] == 60 * 10
    assert 0 < m["pipeline_forecast_skill_ratio{}"] < 10

    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            assert resp.status == 200
    assert m["pipeline_ready{}"] == 1

    assert daemon.stop() == 0
    assert "event=stopped" in daemon.log()


def _wait_metrics(port: int, forecasts: int, timeout_s: float = 15.0) -> dict[str, float]:
    import time

    deadline = time.monotonic() + timeout_s
    m = _metrics(port)
    while m.get("pipeline_end_to_end_latency_seconds_count{}", 0) < forecasts:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
        m = _metrics(port)
    return m


def test_forecasts_do_not_depend_on_interleaving(
    bootstrap: str, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """A stream alone on one partition vs interleaved with 100 others over 6 partitions."""
    rng = random.Random(3)
    solo = [
        (b"solo", _tick(T0 + t, 50 + 5 * math.sin(t / 7) + rng.gauss(0, 1))) for t in range(200)
    ]
    alone = _topics(bootstrap, partitions=1)
    mixed = _topics(bootstrap, partitions=6)
    produce(bootstrap, alone[0], solo)
    others = {f"o{i}".encode(): rng.uniform(1e-3, 1e4) for i in range(100)}
    mixed_records: list[tuple[bytes | None, bytes | None]] = []
    for t, rec in enumerate(solo):
        for key, scale in rng.sample(sorted(others.items()), 20):
            mixed_records.append((key, _tick(T0 + t, scale * rng.uniform(0.9, 1.1))))
        mixed_records.append(rec)
    produce(bootstrap, mixed[0], mixed_records)

    # Small polls force the solo stream's ticks across many micro-batches of varying content.
    start_daemon(_daemon_args(bootstrap, alone))
    start_daemon(_daemon_args(bootstrap, mixed), env={"PIPELINE_KAFKA__MAX_POLL_RECORDS": "97"})
    got_alone = read_topic(bootstrap, alone[1], len(solo), timeout_s=90)
    got_mixed = read_topic(bootstrap, mixed[1], len(mixed_records), timeout_s=120)
    a = [r.json() for r in got_alone]
    b = [r.json() for r in got_mixed if r.key == b"solo"]
    assert len(a) == len(b) == len(solo)
    for x, y in zip(a, b, strict=True):
        assert x["seq"] == y["seq"]
        for u, v in zip(x["forecast"], y["forecast"], strict=True):
            assert u == pytest.approx(v, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("policy", ["dead_letter", "drop"])
def test_late_ticks_follow_the_policy_and_outcomes_reconcile(
    bootstrap: str, start_daemon: Callable[..., DaemonProcess], policy: str
) -> None:
    names = _topics(bootstrap, partitions=3)
    inp, out, dlq, _ = names
    records: list[tuple[bytes | None, bytes | None]] = []
    late: list[bytes] = []
    for t in range(40):
        for s in range(10):
            records.append((f"k{s}".encode(), _tick(T0 + 10 * t, 100.0 + s + t)))
            if t % 10 == 9:  # every 10th round a stream repeats an old timestamp
                value = _tick(T0 + 10 * t - 25, 1.0)
                records.append((f"k{s}".encode(), value))
                late.append(value)
    produce(bootstrap, inp, records)
    port = free_port()
    start_daemon(_daemon_args(bootstrap, names, port), env={"PIPELINE_INPUT__LATE_POLICY": policy})
    forecasts = read_topic(bootstrap, out, 400, timeout_s=90)
    assert len(forecasts) == 400
    for stream in range(10):
        seqs = [r.json()["seq"] for r in forecasts if r.key == f"k{stream}".encode()]
        assert seqs == list(range(1, 41))
    m = _wait_metrics(port, 400)
    per_partition = defaultdict(int)
    for rec in read_topic(bootstrap, inp, len(records)):
        per_partition[rec.partition] += 1
    outcomes = defaultdict(float)
    for key, value in m.items():
        if key.startswith("pipeline_records_total{"):
            labels = dict(kv.split("=") for kv in key[key.index("{") + 1 : -1].split(","))
            outcomes[labels["outcome"]] += value
            per_partition[int(labels["partition"])] -= value
    assert all(v == 0 for v in per_partition.values()), per_partition  # reconciles per partition
    assert outcomes["forecast"] == 400
    if policy == "dead_letter":
        dead = read_topic(bootstrap, dlq, len(late), timeout_s=30)
        assert sorted(r.value for r in dead) == sorted(late)  # original bytes
        assert {r.headers["error"] for r in dead} == {b"late"}
        assert outcomes["dead_letter"] == len(late)
    else:
        assert outcomes["dropped"] == len(late)


def test_multivariate_price_model_with_gaps_end_to_end(
    bootstrap: str, start_daemon: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    """A model trained by `pipeline train` with a covariate and a log target, served by the
    daemon: `values` ticks, forecasts in price units, a missing covariate carried forward, a
    missing target dropped and counted, a non-positive price dead-lettered as out_of_domain."""
    rng = random.Random(3)
    rows, history = ["symbol,timestamp,close,volume"], {}
    for sym, level in (("AAA", 40.0), ("BBB", 900.0)):
        price, prices = level, []
        for i in range(800):
            price *= math.exp(rng.gauss(0, 2e-3))
            prices.append(price)
            rows.append(f"{sym},{1_700_000_000_000 + 60_000 * i},{price:.5f},{rng.randint(1, 900)}")
        history[sym] = prices
    data = tmp_path / "prices.csv"
    data.write_text("\n".join(rows) + "\n")
    model = tmp_path / "px.pt"
    argv = ["train", "--data", str(data), "--format", "long", "--target", "close",
            "--features", "close,volume", "--target-transform", "log", "--horizon", "5",
            "--layers", "8", "--epochs", "1", "--threads", "1", "--out", str(model)]  # fmt: skip
    assert cli_main(argv) == 0

    names = _topics(bootstrap, 2)
    port = free_port()
    start_daemon([*_daemon_args(bootstrap, names, port), "--model", str(model)])
    ticks, last_price = [], {}
    for i in range(30):
        for sym, prices in history.items():
            values: dict[str, object] = {"close": prices[i], "volume": 100 + i}
            if i == 10:
                values["volume"] = None  # carried forward: still a forecast
            if i == 20:
                values["close"] = "NA"  # missing target: dropped, no forecast
            ticks.append((sym.encode(), json.dumps({"ts": T0 + 60 * i, "values": values}).encode()))
            last_price[sym] = prices[i]
    ticks.append(
        (b"AAA", json.dumps({"ts": T0 + 1800, "values": {"close": 0, "volume": 1}}).encode())
    )
    produce(bootstrap, names[0], ticks)

    forecasts = [r.json() for r in read_topic(bootstrap, names[1], 58)]
    dead = read_topic(bootstrap, names[2], 1)
    assert [r.headers["error"] for r in dead] == [b"out_of_domain"]
    for sym in history:
        mine = sorted((d for d in forecasts if d["stream"] == sym), key=lambda d: d["seq"])
        assert [d["seq"] for d in mine] == list(range(1, 30))  # 30 ticks, one target missing
        assert all(abs(f / last_price[sym] - 1) < 0.05 for f in mine[-1]["forecast"])  # prices
    import time

    deadline = time.monotonic() + 15
    while True:
        outcomes: dict[str, int] = defaultdict(int)
        for key, value in _metrics(port).items():
            if key.startswith("pipeline_records_total{"):
                outcomes[key.split("outcome=")[1].split(",")[0]] += int(value)
        if sum(outcomes.values()) >= len(ticks) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert dict(outcomes) == {"forecast": 58, "dead_letter": 1, "dropped": 2}
