"""Issue 5: 10k bad records among the good ticks of 50 streams, on a real broker."""

from __future__ import annotations

import json
import math
import random
import signal
from collections import Counter, defaultdict
from collections.abc import Callable

import pytest

from tests.kafka_helpers import DaemonProcess, create_topics, produce, read_topic, unique
from tests.test_daemon_integration import _metrics, _wait_metrics

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("kafka_client")]

T0 = 1_700_000_000.0


def _bad(rng: random.Random, stream: bytes, t: int) -> tuple[bytes | None, bytes, str]:
    kind = rng.randrange(11)
    if kind == 9:  # a missing value: no forecast, no dead letter, counted as dropped
        return stream, json.dumps({"ts": T0 + t, "value": None}).encode(), "missing"
    if kind == 10:
        return stream, json.dumps({"ts": T0 + t, "value": "NA"}).encode(), "missing"
    if kind == 0:
        return stream, b'{"ts": 17000', "invalid_json"
    if kind == 1:
        return stream, b'"just a string"', "not_an_object"
    if kind == 2:
        return None, json.dumps({"ts": T0 + t, "value": 1.0}).encode(), "missing_stream"
    if kind == 3:
        return stream, json.dumps({"ts": T0 + t}).encode(), "missing_field"
    if kind == 4:
        return stream, json.dumps({"ts": T0 + t, "value": [1]}).encode(), "bad_type"
    if kind == 5:
        return stream, b'{"ts": 1700000000, "value": Infinity}', "non_finite"
    if kind == 6:
        return stream, json.dumps({"ts": "soon", "value": 1.0}).encode(), "bad_timestamp"
    if kind == 7:
        return (
            stream,
            b'{"ts": 1700000000, "value": 1, "pad": "' + b"x" * 2_000 + b'"}',
            "too_large",
        )
    return stream, json.dumps({"ts": T0 + t, "values": {"other": 1.0}}).encode(), "unknown_feature"


def test_ten_thousand_bad_records_are_all_accounted_for(
    bootstrap: str, start_daemon: Callable[..., DaemonProcess]
) -> None:
    rng = random.Random(2024)
    good: list[tuple[bytes | None, bytes | None]] = []
    for t in range(40):
        for s in range(50):
            value = (10 ** (s % 6 - 2)) * (3 + math.sin(t / 6 + s))
            good.append((f"g{s:02d}".encode(), json.dumps({"ts": T0 + t, "value": value}).encode()))
    mixed: list[tuple[bytes | None, bytes | None]] = []
    expected = Counter()
    bad_per_good = 12_300 / len(good)
    owed = 0.0
    for i, rec in enumerate(good):
        owed += bad_per_good
        while owed >= 1:
            key, value, reason = _bad(rng, rec[0] or b"", i)
            mixed.append((key, value))
            expected[reason] += 1
            owed -= 1
        mixed.append(rec)
    missing = expected.pop("missing")
    assert sum(expected.values()) >= 10_000 and missing > 1_000

    clean_names = unique("clean"), unique("fc"), unique("dlq"), unique("g")
    dirty_names = unique("dirty"), unique("fc"), unique("dlq"), unique("g")
    for names in (clean_names, dirty_names):
        create_topics(bootstrap, names[:3], 3)
    produce(bootstrap, clean_names[0], good)
    produce(bootstrap, dirty_names[0], mixed)
    port = _free()
    for (inp, out, dlq, group), metrics_port in ((clean_names, 0), (dirty_names, port)):
        args = ["--bootstrap-servers", bootstrap, "--input-topic", inp, "--output-topic", out,
                "--dlq-topic", dlq, "--group-id", group, "--metrics-port", str(metrics_port),
                "--no-sample-feed"]  # fmt: skip
        start_daemon(args, env={"PIPELINE_INPUT__MAX_RECORD_BYTES": "1024"})

    clean = read_topic(bootstrap, clean_names[1], len(good), timeout_s=120)
    dirty = read_topic(bootstrap, dirty_names[1], len(good), timeout_s=120)
    dead = read_topic(bootstrap, dirty_names[2], sum(expected.values()), timeout_s=120)
    # Every good tick has its forecast, identical to the run without bad records.
    assert len(clean) == len(dirty) == len(good)
    ref = {(d["stream"], d["seq"]): d["forecast"] for d in (r.json() for r in clean)}
    got = {(d["stream"], d["seq"]): d["forecast"] for d in (r.json() for r in dirty)}
    assert got.keys() == ref.keys()
    for key, forecast in got.items():
        assert forecast == pytest.approx(ref[key], rel=1e-6), key
    # Every bad record is in the DLQ with the right reason and its source coordinates.
    assert Counter(r.headers["error"].decode() for r in dead) == expected
    assert all(r.headers["source.topic"] == dirty_names[0].encode() for r in dead)
    # Counters reconcile with the offsets consumed, per partition.
    m = _wait_metrics(port, len(good))
    per_partition: dict[int, int] = defaultdict(int)
    for rec in read_topic(bootstrap, dirty_names[0], len(mixed), timeout_s=60):
        per_partition[rec.partition] += 1
    for key, value in m.items():
        if key.startswith("pipeline_records_total{"):
            labels = dict(kv.split("=") for kv in key[key.index("{") + 1 : -1].split(","))
            per_partition[int(labels["partition"])] -= int(value)
    assert all(v == 0 for v in per_partition.values()), per_partition
    dropped = sum(int(v) for k, v in m.items() if k.startswith("pipeline_records_total{")
                  and "outcome=dropped" in k)  # fmt: skip
    assert dropped == missing
    assert _metrics(port)["pipeline_forecasts_emitted_total{topic=" + dirty_names[1] + "}"] == len(
        good
    )


def _free() -> int:
    from pipeline.embedded import free_port

    return free_port()


def _odd_records(rng: random.Random, t: int, round_: int) -> list[tuple[bytes | None, bytes]]:
    """Odd but valid: new streams whose only ticks have null/"NA" targets, keyless ticks that
    name a stream in their body, and new streams living at 1e-300."""
    out: list[tuple[bytes | None, bytes]] = []
    for k in range(4):
        stream = f"nullonly-{round_}-{t}-{k}".encode()
        out.append((stream, json.dumps({"ts": T0 + t, "value": rng.choice([None, "NA"])}).encode()))
    for _ in range(3):
        doc = {"ts": T0 + t, "value": 1.5, "stream": f"g{rng.randrange(40):02d}"}
        out.append((None, json.dumps(doc).encode()))
    for k in range(3):
        value = 1e-300 * (1 + 0.1 * math.sin(t + k))
        out.append((f"tiny-{k}".encode(), json.dumps({"ts": T0 + t, "value": value}).encode()))
    return out


def test_odd_but_valid_records_never_stop_the_daemon(
    bootstrap: str, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """Issue 11's acceptance: 200 odd records among 40 ordinary streams, then a restart on the
    same group with 200 more. One new stream whose first value was null killed the daemon in a
    loop before (its state went to changelog partition -1, before the offset was committed)."""
    rng = random.Random(11)
    inp, out, dlq, group = unique("ticks"), unique("fc"), unique("dlq"), unique("g")
    create_topics(bootstrap, [inp, out, dlq], 3)
    args = ["--bootstrap-servers", bootstrap, "--input-topic", inp, "--output-topic", out,
            "--dlq-topic", dlq, "--group-id", group, "--metrics-port", "0",
            "--no-sample-feed"]  # fmt: skip

    def feed(start: int, round_: int) -> tuple[int, int]:
        records: list[tuple[bytes | None, bytes | None]] = []
        odd = 0
        for t in range(start, start + 20):
            batch = _odd_records(rng, t, round_)  # 10 odd records per round of ticks
            records += batch
            odd += len(batch)
            for s in range(40):
                value = 10.0 * (s + 1) + math.sin(t / 3 + s)
                records.append((f"g{s:02d}".encode(),
                                json.dumps({"ts": T0 + t, "value": value}).encode()))  # fmt: skip
        produce(bootstrap, inp, records)
        return odd, 20 * 40

    odd, ordinary = feed(0, 1)
    assert odd == 200
    first = start_daemon(args, env={"PIPELINE_KAFKA__INSTANCE_ID": "a"})
    docs = [r.json() for r in read_topic(bootstrap, out, ordinary + 60, idle_s=2)]
    assert first.proc.poll() is None, first.log()[-3000:]
    first.stop(signal.SIGKILL)  # a crash; the restart must not meet a poison pill either

    odd, _ = feed(20, 2)
    assert odd == 200
    second = start_daemon(args, env={"PIPELINE_KAFKA__INSTANCE_ID": "a"})
    docs = [r.json() for r in read_topic(bootstrap, out, 2 * (ordinary + 60), idle_s=2)]
    assert second.proc.poll() is None, second.log()[-3000:]
    for s in range(40):  # every ordinary tick forecast once per seq, the restart continuing
        seqs = sorted({d["seq"] for d in docs if d["stream"] == f"g{s:02d}"})
        assert seqs == list(range(1, 41)), (s, seqs)
    tiny = [d for d in docs if d["stream"].startswith("tiny-")]
    assert {d["seq"] for d in tiny if d["stream"] == "tiny-0"} == set(range(1, 41))
    assert all(math.isfinite(v) and abs(v) < 1e-290 for d in tiny for v in d["forecast"])
    assert not [d for d in docs if d["stream"].startswith("nullonly")]
    dead = read_topic(bootstrap, dlq, 2 * 60, idle_s=1)
    assert Counter(r.headers["error"].decode() for r in dead) == {"missing_key": 120}
    assert second.stop() == 0
    assert "Traceback" not in first.log() + second.log()
    assert "event=state_restored" in second.log()
