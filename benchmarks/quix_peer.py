"""The peer a user would pick instead: a Quix Streams app doing the daemon's per-stream GRU job.

Per record, as a Quix user would write it (one ``apply`` with keyed state, batch 1): JSON in,
the stream's exponentially weighted mean and variance, a stacked ``GRUCell`` 64 → 32 and a
``Linear`` 32 → 24 on the normalized value, the hidden states and statistics kept in Quix's
keyed state (RocksDB + its changelog topic), a forecast record with 24 values out. Exactly-once
(Quix's ``processing_guarantee="exactly-once"``) like the daemon's default. The weights are
random (seeded): this measures throughput, not accuracy.

Runs in its own virtual environment (``.venv-quix``: quixstreams pins its own confluent-kafka),
made by ``make bench-quix`` (``benchmarks/e2e_bench.py`` starts it as the system ``quix``):
``.venv-quix/bin/python -m benchmarks.quix_peer --bootstrap-servers B --input-topic I
--output-topic O --group-id G``. SIGTERM stops it (Quix commits its checkpoint).

Tansu's topic descriptions lack ``retention.ms``/``retention.bytes``, which Quix's changelog
derivation reads (../shared/notes/broker.md): they are filled in as infinite.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

HORIZON = 24
ALPHA = 0.05  # weight of the newest value in the running mean and variance


def build_step() -> Any:
    """The per-record model step: (value, state dict) -> forecast list; updates the state."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cell1, cell2 = torch.nn.GRUCell(1, 64), torch.nn.GRUCell(64, 32)
    head = torch.nn.Linear(32, HORIZON)

    @torch.no_grad()
    def step(value: float, st: dict[str, Any]) -> list[float]:
        mean, var = st.get("mean", value), st.get("var", 1.0)
        mean += ALPHA * (value - mean)
        var = (1 - ALPHA) * (var + ALPHA * (value - mean) ** 2)
        std = max(var, 1e-12) ** 0.5
        x = torch.tensor([[(value - mean) / std]])
        h1 = torch.tensor([st["h1"]]) if "h1" in st else torch.zeros(1, 64)
        h2 = torch.tensor([st["h2"]]) if "h2" in st else torch.zeros(1, 32)
        h1 = cell1(x, h1)
        h2 = cell2(h1, h2)
        y = head(h2)[0] * std + mean
        st.update(mean=mean, var=var, h1=h1[0].tolist(), h2=h2[0].tolist())
        return list(y.tolist())

    return step


def run(bootstrap: str, input_topic: str, output_topic: str, group: str) -> int:
    from quixstreams import Application
    from quixstreams.models import TopicConfig

    step = build_step()
    app = Application(
        broker_address=bootstrap,
        consumer_group=group,
        auto_offset_reset="earliest",
        processing_guarantee="exactly-once",
        state_dir=tempfile.mkdtemp(prefix="quix-state-"),
        consumer_extra_config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 500},
    )
    retention = {"retention.ms": "-1", "retention.bytes": "-1"}
    src = app.topic(
        input_topic,
        key_deserializer="str",
        value_deserializer="json",
        config=TopicConfig(num_partitions=6, replication_factor=1, extra_config=retention),
    )
    dst = app.topic(output_topic, key_serializer="str", value_serializer="json")
    # Tansu's topic description lacks the retention settings Quix derives its changelog from.
    for name, value in retention.items():
        src.broker_config.extra_config.setdefault(name, value)

    def forecast(value: dict[str, Any], key: str, timestamp: int, headers: Any, state: Any) -> Any:
        st = state.get("s") or {}
        out = step(float(value["value"]), st)
        state.set("s", st)
        return {"stream": key, "ts": value["ts"], "value": value["value"], "forecast": out}

    sdf = app.dataframe(src)
    sdf = sdf.apply(forecast, stateful=True, metadata=True)
    sdf.to_topic(dst)
    app.run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quix_peer", description=__doc__)
    p.add_argument("--bootstrap-servers", required=True)
    p.add_argument("--input-topic", required=True)
    p.add_argument("--output-topic", required=True)
    p.add_argument("--group-id", required=True)
    a = p.parse_args(argv)
    return run(a.bootstrap_servers, a.input_topic, a.output_topic, a.group_id)


if __name__ == "__main__":
    sys.exit(main())
