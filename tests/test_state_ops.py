"""Hot model reload and bounded memory (eviction with tombstones) on a real broker."""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pipeline.model import Forecaster, ModelConfig, ModelMeta, load_model, save_model
from tests.kafka_helpers import DaemonProcess, create_topics, produce, read_topic, unique

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("kafka_client")]

T0 = 1_700_000_000.0


def _ticks(start: int, n: int, streams: int) -> list[tuple[bytes | None, bytes | None]]:
    return [
        (f"z{s}".encode(), json.dumps({"ts": T0 + t, "value": 5.0 + s + 0.1 * (t % 9)}).encode())
        for t in range(start, start + n)
        for s in range(streams)
    ]


def _args(bootstrap: str, inp: str, out: str, group: str, *extra: str) -> list[str]:
    return ["--bootstrap-servers", bootstrap, "--input-topic", inp, "--output-topic", out,
            "--dlq-topic", unique("dlq"), "--group-id", group, "--metrics-port", "0",
            "--no-sample-feed", *extra]  # fmt: skip


def _model_like_default(tmp: Path, layers: tuple[int, ...], name: str) -> Path:
    default = load_model(None)
    torch.manual_seed(0)
    config = ModelConfig(default.model.config.n_inputs, layers, default.model.config.horizon)
    meta = ModelMeta(config=config, normalizer=default.meta.normalizer, name=name)
    path = tmp / f"{name}.pt"
    save_model(Forecaster(config), meta, path)
    return path


def test_hot_reload_keeps_or_rewarms_state(
    bootstrap: str, start_daemon: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    serving = tmp_path / "serving.pt"
    shutil.copy(load_model(None).path, serving)
    shutil.copy(load_model(None).path.with_suffix(".json"), serving.with_suffix(".json"))
    inp, out, group = unique("ticks"), unique("fc"), unique("g")
    create_topics(bootstrap, [inp], 2)
    daemon = start_daemon(_args(bootstrap, inp, out, group, "--model", str(serving)),
                          env={"PIPELINE_MODEL__WATCH_SECONDS": "0.5"})  # fmt: skip
    produce(bootstrap, inp, _ticks(0, 10, 4))
    assert len(read_topic(bootstrap, out, 40)) == 40

    # Same shapes, new weights, delivered by SIGHUP: streams keep their state.
    same = _model_like_default(tmp_path, (64, 32), "same-shapes")
    shutil.copy(same, serving)
    shutil.copy(same.with_suffix(".json"), serving.with_suffix(".json"))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for("outcome=kept_state", timeout_s=30)

    # Other shapes, picked up by the file watch: hidden states restart, seq continues.
    other = _model_like_default(tmp_path, (16,), "small")
    time.sleep(1.1)  # a later mtime than the previous copy
    shutil.copy(other.with_suffix(".json"), serving.with_suffix(".json"))
    shutil.copy(other, serving)
    daemon.wait_for("outcome=rewarmed", timeout_s=30)
    produce(bootstrap, inp, _ticks(10, 5, 4))
    docs = [r.json() for r in read_topic(bootstrap, out, 60)]
    late = [d for d in docs if d["ts"] >= T0 + 10]
    assert {d["model"] for d in late} == {load_model(serving).meta.version}
    assert sorted(d["seq"] for d in late if d["stream"] == "z0") == list(range(11, 16))

    # A broken file is refused and the old model keeps serving.
    serving.write_bytes(b"not a model")
    daemon.wait_for("event=model_reload_failed", timeout_s=30)
    assert daemon.proc.poll() is None


def test_stream_cap_evicts_and_tombstones(
    bootstrap: str, start_daemon: Callable[..., DaemonProcess]
) -> None:
    inp, out, group = unique("ticks"), unique("fc"), unique("g")
    create_topics(bootstrap, [inp], 2)
    env = {"PIPELINE_STATE__MAX_STREAMS": "5", "PIPELINE_STATE__EVICT_INTERVAL_SECONDS": "0.2"}
    daemon = start_daemon(_args(bootstrap, inp, out, group), env=env)
    produce(bootstrap, inp, _ticks(0, 3, 12))
    assert len(read_topic(bootstrap, out, 36)) == 36
    produce(bootstrap, inp, _ticks(3, 1, 2))  # a later batch runs the eviction
    assert len(read_topic(bootstrap, out, 38)) == 38
    daemon.wait_for("event=streams_evicted", timeout_s=30)
    changelog = read_topic(bootstrap, f"{group}.state", 100, timeout_s=10)
    tombstones = {r.key for r in changelog if r.value is None}
    assert len(tombstones) >= 7  # 12 streams, at most 5 kept
    assert daemon.stop() == 0
