"""Part (a): the engine alone (no Kafka) versus the naive per-tick design, plus decode.

Workload: ``n`` streams with random-walk-plus-season values at scales from 1e-3 to 1e5; one
micro-batch is ``ticks_per_stream`` rounds, every round holding one tick of every stream in a fresh
random order (so streams interleave while each keeps its own order). The engine is warmed first so
every stream has state and every array has grown; batches are built outside the timed region.

Baseline: the same torch model stepped one tick at a time (``model.step`` with batch 1) after the
same normalizer, each stream owning a 1-slot :class:`~pipeline.normalize.Normalizer` and its own
hidden state: the per-tick design. It is slow, so it is timed on a fixed number of ticks.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import pipeline.engine as engine_module
from pipeline.engine import Engine
from pipeline.messages import ForecastEncoder, Source, Tick, decode, encode_forecast, encode_tick
from pipeline.model import LoadedModel, load_model
from pipeline.normalize import Normalizer, horizon_scale
from pipeline.ticks import TickBatch, decode_records

from .report import fmt_rate, fmt_ratio, median, spread, table, verdict

SOURCE = Source("ticks", 0, 0, -1)
RANK = "group ticks by stream (_rank_by_stream)"
SLOTS = "stream -> slot lookup (slots_for)"
NORM = "normalizer.step"
MODEL = "model.step (2 GRU cells + head)"
SCORE = "Engine._score (forecast error stats)"
MARK = "store.mark (source partition/offset)"
WAVE_REST = "wave rest: gather/scatter state, finite check, forecast"
PROCESS_REST = "process rest: argsort into waves, outputs"
T0 = 1_750_000_000.0  # event time of the first round (epoch s)


@dataclass
class EngineConfig:
    scales: tuple[int, ...] = (1_000, 10_000, 100_000)
    ticks_per_stream: int = 2  # rounds per micro-batch
    warm_batches: int = 2
    repeats: int = 5
    per_tick_ticks: int = 5_000
    per_tick_streams: int = 1_000
    decode_records: int = 50_000
    breakdown_streams: int = 10_000

    @classmethod
    def quick(cls) -> EngineConfig:
        return cls(repeats=3, per_tick_ticks=1_000, decode_records=20_000, warm_batches=1)


class Workload:
    """Seeded synthetic streams: season + AR noise + drift (like ``pipeline simulate``)."""

    def __init__(self, n_streams: int, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        n = n_streams
        self.names = [f"sensor-{i:06d}" for i in range(n)]
        self.scale = 10.0 ** self.rng.uniform(-3, 5, n)
        self.level = self.scale * self.rng.uniform(1, 10, n)
        self.period = self.rng.uniform(20, 200, n)
        self.phase = self.rng.uniform(0, 2 * math.pi, n)
        self.ar = np.zeros(n)
        self.k = 0

    def round(self) -> tuple[np.ndarray, float]:
        n = len(self.names)
        self.ar = 0.8 * self.ar + self.rng.normal(0, 0.3, n)
        self.level = self.level + self.scale * self.rng.normal(0, 0.02, n)
        season = np.sin(2 * math.pi * self.k / self.period + self.phase)
        values = self.level + self.scale * (season + self.ar)
        ts = T0 + self.k
        self.k += 1
        return values, ts

    def batch(self, rounds: int) -> list[Tick]:
        ticks: list[Tick] = []
        names = self.names
        for _ in range(rounds):
            values, ts = self.round()
            vals = values.tolist()
            order = self.rng.permutation(len(names)).tolist()
            ticks.extend([Tick(names[i], ts, (vals[i],), SOURCE) for i in order])
        return ticks

    def ticks(self) -> Iterator[Tick]:
        while True:
            yield from self.batch(1)


class PerTick:
    """The naive design: one normalizer update and one batch-1 ``model.step`` per tick."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.model = loaded.model.eval()
        self.config = loaded.meta.normalizer
        self.n_features = len(loaded.meta.features)
        self.target = loaded.meta.features.index(loaded.meta.target)
        self.hscale = horizon_scale(loaded.model.config.horizon)
        self.streams: dict[str, tuple[Normalizer, list[torch.Tensor]]] = {}
        self.slot = np.zeros(1, dtype=np.int64)

    def process_one(self, tick: Tick) -> np.ndarray:
        state = self.streams.get(tick.stream)
        if state is None:
            state = (Normalizer(self.config, self.n_features, 1), self.model.initial_state(1))
            self.streams[tick.stream] = state
        norm, hidden = state
        step = norm.step(self.slot, np.array([tick.values]), np.array([tick.ts]), self.target)
        y, new_hidden = self.model.step(torch.from_numpy(step.inputs), hidden)
        hidden[:] = new_hidden
        return step.last[0] + step.scale[0] * self.hscale * y[0].double().numpy()


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_engine_scale(loaded: LoadedModel, n_streams: int, cfg: EngineConfig) -> dict[str, Any]:
    engine = Engine(loaded)
    work = Workload(n_streams, seed=n_streams)
    for _ in range(cfg.warm_batches):
        engine.process(TickBatch.from_ticks(work.batch(cfg.ticks_per_stream)))
    rates, model_share, waves = [], [], []
    for _ in range(cfg.repeats):
        batch = TickBatch.from_ticks(work.batch(cfg.ticks_per_stream))  # as the decoder hands it
        t0 = time.perf_counter()
        out = engine.process(batch)
        seconds = time.perf_counter() - t0
        rates.append(len(batch) / seconds)
        model_share.append(out.model_seconds / seconds)
        waves.append(out.waves)
    return {
        "streams": n_streams,
        "batch_ticks": n_streams * cfg.ticks_per_stream,
        "ticks_per_s": spread(rates),
        "model_seconds_share": spread(model_share),
        "waves": waves[0],
        "state_bytes": engine.store.state_bytes(),
    }


def skewed_batch(work: Workload, hot_ticks: int) -> list[Tick]:
    """One round of every stream, plus ``hot_ticks`` more ticks of stream 0 spread through it:
    the hot stream holds about half of the batch when ``hot_ticks`` = number of streams."""
    ticks = work.batch(1)
    hot = work.names[0]
    ts0 = ticks[0].ts
    extra = [
        Tick(hot, ts0 + (k + 1) / (hot_ticks + 1), (float(ticks[0].values[0]) * (1 + 1e-4 * k),),
             SOURCE)
        for k in range(hot_ticks)
    ]  # fmt: skip
    rest = [t for t in ticks if t.stream != hot]
    first = [t for t in ticks if t.stream == hot]
    merged: list[Tick] = first
    step = max(len(rest) // max(hot_ticks, 1), 1)
    for k, tick in enumerate(extra):
        merged.extend(rest[k * step : (k + 1) * step])
        merged.append(tick)
    merged.extend(rest[len(extra) * step :])
    return merged


def bench_engine_skewed(loaded: LoadedModel, n_streams: int, cfg: EngineConfig) -> dict[str, Any]:
    """Engine ticks/s when one stream holds half of each micro-batch (a hot market symbol)."""
    engine = Engine(loaded)
    work = Workload(n_streams, seed=n_streams + 1)
    for _ in range(cfg.warm_batches):
        engine.process(TickBatch.from_ticks(skewed_batch(work, n_streams)))
    rates, waves = [], []
    for _ in range(cfg.repeats):
        batch = TickBatch.from_ticks(skewed_batch(work, n_streams))
        t0 = time.perf_counter()
        out = engine.process(batch)
        rates.append(len(batch) / (time.perf_counter() - t0))
        waves.append(out.waves)
    hot = sum(1 for s in batch.stream if s == work.names[0])
    return {
        "streams": n_streams,
        "batch_ticks": len(batch),
        "hot_share": hot / len(batch),
        "ticks_per_s": spread(rates),
        "waves": waves[0],
    }


def bench_per_tick(loaded: LoadedModel, cfg: EngineConfig) -> dict[str, Any]:
    base = PerTick(loaded)
    work = Workload(cfg.per_tick_streams, seed=7)
    ticks = work.ticks()
    for _ in range(cfg.per_tick_streams):  # warm: every stream has state
        base.process_one(next(ticks))
    rates = []
    for _ in range(cfg.repeats):
        chunk = [next(ticks) for _ in range(cfg.per_tick_ticks)]
        process = base.process_one
        seconds = _timed(lambda chunk=chunk, process=process: [process(t) for t in chunk])
        rates.append(len(chunk) / seconds)
    return {
        "ticks_per_repeat": cfg.per_tick_ticks,
        "streams": cfg.per_tick_streams,
        "ticks_per_s": spread(rates),
    }


def check_equivalence(loaded: LoadedModel, n_streams: int = 200, rounds: int = 30) -> float:
    """Max |engine - per-tick| / |value| over the same ticks: both compute the same thing (the
    model's own forecast; what is served mixes it with cheap rules)."""
    work = Workload(n_streams, seed=3)
    ticks = work.batch(rounds)
    engine, base = Engine(loaded, keep_model=True), PerTick(loaded)
    worst = 0.0
    for k in range(0, len(ticks), 2 * n_streams):  # micro-batches of 2 rounds
        part = ticks[k : k + 2 * n_streams]
        out = engine.process(part)
        for i, tick in enumerate(part):
            ref = base.process_one(tick)
            denom = max(abs(tick.values[0]), 1e-12)
            worst = max(worst, float(np.max(np.abs(out.model_forecast[i] - ref))) / denom)
    return worst


@contextlib.contextmanager
def _instrumented(engine: Engine, totals: dict[str, float]) -> Iterator[None]:
    """Time the engine's parts by wrapping them in this process (no source file is touched)."""

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0

        return timed

    store, norm, model = engine.store, engine.store.normalizer, engine.model
    original_rank = engine_module._rank_by_stream
    engine_module._rank_by_stream = wrap(RANK, original_rank)
    patched: list[tuple[object, str]] = [
        (store, "slots_for"),
        (norm, "step"),
        (model, "step"),
        (engine, "_score"),
        (store, "mark"),
    ]
    names = {
        (store, "slots_for"): SLOTS,
        (norm, "step"): NORM,
        (model, "step"): MODEL,
        (engine, "_score"): SCORE,
        (store, "mark"): MARK,
    }
    done = []
    for obj, attr in patched:
        if hasattr(obj, attr):  # the engine evolves: time what exists
            setattr(obj, attr, wrap(names[(obj, attr)], getattr(obj, attr)))
            done.append((obj, attr))
    try:
        yield
    finally:
        engine_module._rank_by_stream = original_rank
        for obj, attr in done:
            with contextlib.suppress(AttributeError):
                delattr(obj, attr)


def bench_breakdown(loaded: LoadedModel, n_streams: int, cfg: EngineConfig) -> dict[str, Any]:
    """Where one ``Engine.process`` call spends its time at ``n_streams`` streams."""
    engine = Engine(loaded)
    work = Workload(n_streams, seed=11)
    for _ in range(cfg.warm_batches):
        engine.process(TickBatch.from_ticks(work.batch(cfg.ticks_per_stream)))
    totals: dict[str, float] = {}
    wall = model_seconds = 0.0
    ticks = 0
    with _instrumented(engine, totals):
        for _ in range(cfg.repeats):
            batch = TickBatch.from_ticks(work.batch(cfg.ticks_per_stream))
            t0 = time.perf_counter()
            out = engine.process(batch)
            wall += time.perf_counter() - t0
            model_seconds += out.model_seconds
            ticks += len(batch)
    t = {k: totals.get(k, 0.0) for k in (RANK, SLOTS, NORM, MODEL, SCORE, MARK)}
    parts = {
        RANK: t[RANK],
        SLOTS: t[SLOTS],
        NORM: t[NORM],
        MODEL: t[MODEL],
        SCORE: t[SCORE],
        WAVE_REST: model_seconds - t[NORM] - t[MODEL] - t[SCORE],
        MARK: t[MARK],
        PROCESS_REST: wall - model_seconds - t[RANK] - t[SLOTS] - t[MARK],
    }
    return {
        "streams": n_streams,
        "ticks": ticks,
        "wall_s": wall,
        "model_seconds_reported": model_seconds,
        "us_per_tick": {k: v / ticks * 1e6 for k, v in parts.items()},
        "share": {k: v / wall for k, v in parts.items()},
    }


def bench_threads(loaded: LoadedModel, n_streams: int, cfg: EngineConfig) -> dict[str, Any]:
    """The engine at ``n_streams`` with torch limited to one thread (information)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = bench_engine_scale(loaded, n_streams, cfg)
    finally:
        torch.set_num_threads(before)
    result["torch_threads"] = 1
    return result


def bench_codec(cfg: EngineConfig) -> dict[str, Any]:
    """Per-record cost of the daemon's decode and forecast encode, each beside its baseline:
    the columnar decoder (pipeline.ticks) and the reference decoder vs bare ``json.loads``; the
    batch encoder and the one-record encoder vs ``json.dumps`` of a small dict."""
    rng = np.random.default_rng(5)
    n = cfg.decode_records
    keys = [f"stream-{i % 1000:05d}".encode() for i in range(n)]
    vals = [encode_tick(1.79e9 + i * 1e-3, float(v)) for i, v in enumerate(rng.normal(size=n))]
    srcs = [Source("ticks", i % 6, i, -1) for i in range(n)]
    raw = [(k, v, i % 6, i, -1) for i, (k, v) in enumerate(zip(keys, vals, strict=True))]

    def run_columnar() -> None:
        decode_records("ticks", raw)

    def run_decode() -> None:
        for k, v, s in zip(keys, vals, srcs, strict=True):
            decode(k, v, s)

    def run_loads() -> None:
        loads = json.loads
        for v in vals:
            loads(v)

    horizon = [float(x) for x in rng.normal(100, 5, 24)]
    matrix = rng.normal(100, 5, (n, 24))
    names = [f"stream-{i % 1000:05d}" for i in range(n)]
    times = 1.79e9 + np.arange(n, dtype=np.float64)
    seqs = np.arange(n)
    warm = [True] * n

    def run_batch_encode() -> None:
        ForecastEncoder().encode(names, times, seqs, matrix, "forecaster-01234", warm)

    def run_encode() -> None:
        for i in range(n):
            encode_forecast("stream-00001", 1.79e9 + i, i, horizon, "forecaster-0123456789ab", True)

    def run_dumps() -> None:
        dumps = json.dumps
        for i in range(n):
            dumps({"stream": "stream-00001", "ts": 1.79e9 + i, "value": 1.5}).encode()

    out: dict[str, Any] = {"records": n}
    for name, fn in (
        ("decode_columnar", run_columnar),
        ("decode", run_decode),
        ("json_loads", run_loads),
        ("encode_batch_h24", run_batch_encode),
        ("encode_forecast_h24", run_encode),
        ("json_dumps_small", run_dumps),
    ):
        secs = [_timed(fn) for _ in range(cfg.repeats)]
        out[name] = {
            "records_per_s": spread([n / s for s in secs]),
            "us_per_record": median(secs) / n * 1e6,
        }
    return out


def _daemon_threads() -> int | None:
    """The torch thread count ``pipeline run`` uses by default (None: torch's own default)."""
    try:
        from pipeline.config import ModelSettings

        value = ModelSettings().torch_threads
    except Exception:  # the settings evolve; this is information only
        return None
    return int(value) if value else None


def bench_combination(loaded: LoadedModel, n_streams: int, cfg: EngineConfig) -> dict[str, Any]:
    """The served mix and its bounds against the model alone (``forecast.combine: false``):
    the same batches through both engines, alternating, uniform and skewed."""
    out: dict[str, Any] = {"streams": n_streams}
    for kind in ("uniform", "skewed"):
        engines = {"on": Engine(loaded), "off": Engine(loaded, combining=False)}
        work = Workload(n_streams, seed=n_streams + 2)
        rates: dict[str, list[float]] = {"on": [], "off": []}
        for i in range(cfg.warm_batches + cfg.repeats):
            ticks = work.batch(cfg.ticks_per_stream) if kind == "uniform" else None
            batch = TickBatch.from_ticks(ticks or skewed_batch(work, n_streams))
            if i < cfg.warm_batches:
                for engine in engines.values():
                    engine.process(batch)
                continue
            for name, engine in engines.items():
                t0 = time.perf_counter()
                engine.process(batch)
                rates[name].append(len(batch) / (time.perf_counter() - t0))
        ratios = [a / b for a, b in zip(rates["on"], rates["off"], strict=True)]
        out[kind] = {
            "on": spread(rates["on"]),
            "off": spread(rates["off"]),
            "ratio": spread(ratios),
        }
    return out


def run(cfg: EngineConfig) -> dict[str, Any]:
    loaded = load_model(None)
    mc = loaded.model.config
    result: dict[str, Any] = {
        "model": {
            "cell": mc.cell,
            "layers": list(mc.layers),
            "horizon": mc.horizon,
            "version": loaded.meta.version,
            "parameters": loaded.model.n_parameters(),
        },
        "torch_threads": torch.get_num_threads(),
        "daemon_torch_threads": _daemon_threads(),
        "repeats": cfg.repeats,
        "ticks_per_stream_per_batch": cfg.ticks_per_stream,
    }
    result["equivalence_max_rel_diff"] = check_equivalence(loaded)
    result["per_tick"] = bench_per_tick(loaded, cfg)
    result["engine"] = [bench_engine_scale(loaded, n, cfg) for n in cfg.scales]
    result["engine_1_thread"] = bench_threads(loaded, cfg.breakdown_streams, cfg)
    result["engine_skewed"] = bench_engine_skewed(loaded, cfg.breakdown_streams, cfg)
    result["combination"] = bench_combination(loaded, cfg.breakdown_streams, cfg)
    result["breakdown"] = bench_breakdown(loaded, cfg.breakdown_streams, cfg)
    result["codec"] = bench_codec(cfg)
    base = result["per_tick"]["ticks_per_s"]["median"]
    for row in result["engine"]:
        row["ratio_vs_per_tick"] = row["ticks_per_s"]["median"] / base
    at10k = next((r for r in result["engine"] if r["streams"] == 10_000), None)
    result["targets"] = {
        "engine_ticks_per_s_at_10k": {
            "target": 300_000,
            "value": at10k["ticks_per_s"]["median"] if at10k else None,
            "met": at10k["ticks_per_s"]["median"] >= 300_000 if at10k else None,
        },
        "engine_skewed_ticks_per_s_at_10k": {
            "target": 100_000,
            "value": result["engine_skewed"]["ticks_per_s"]["median"],
            "met": result["engine_skewed"]["ticks_per_s"]["median"] >= 100_000,
        },
        "ratio_vs_per_tick_at_10k": {
            "target": 50,
            "value": at10k["ratio_vs_per_tick"] if at10k else None,
            "met": at10k["ratio_vs_per_tick"] >= 50 if at10k else None,
        },
        "combination_ratio_at_10k": {
            "target": 0.85,
            "value": result["combination"]["uniform"]["ratio"]["median"],
            "met": result["combination"]["uniform"]["ratio"]["median"] >= 0.85,
        },
    }
    return result


def render(r: dict[str, Any]) -> str:
    m = r["model"]
    base = r["per_tick"]["ticks_per_s"]
    lines = [
        f"ENGINE (no Kafka): model {m['cell']} {tuple(m['layers'])} horizon {m['horizon']} "
        f"({m['parameters']:,} params), torch threads {r['torch_threads']}, "
        f"{r['repeats']} repeats, medians [min..max]; micro-batch = "
        f"{r['ticks_per_stream_per_batch']} ticks per stream, interleaved",
        f"baseline (per-tick loop: batch-1 model.step + 1-slot normalizer per stream): "
        f"{fmt_rate(base['median'])} ticks/s [{fmt_rate(base['min'])}..{fmt_rate(base['max'])}] "
        f"on {r['per_tick']['ticks_per_repeat']:,} ticks over {r['per_tick']['streams']:,} streams",
        f"torch threads here: {r['torch_threads']} (torch default on this machine); the daemon's "
        f"default (pipeline.config ModelSettings.torch_threads): "
        f"{r.get('daemon_torch_threads') or 'torch default'} -- see the 1-thread row",
        f"engine vs per-tick forecasts: max |diff| / |value| = "
        f"{r['equivalence_max_rel_diff']:.1e} (same computation)",
        "",
    ]
    rows = []
    for row in r["engine"]:
        t = row["ticks_per_s"]
        rows.append(
            [
                f"{row['streams']:,}",
                f"{row['batch_ticks']:,}",
                fmt_rate(t["median"]),
                f"{fmt_rate(t['min'])}..{fmt_rate(t['max'])}",
                fmt_rate(base["median"]),
                fmt_ratio(row["ratio_vs_per_tick"]),
                f"{row['model_seconds_share']['median'] * 100:.0f}%",
            ]
        )

    def engine_row(label: str, batch: str, row: dict[str, Any], last: str) -> list[str]:
        t = row["ticks_per_s"]
        return [
            label,
            batch,
            fmt_rate(t["median"]),
            f"{fmt_rate(t['min'])}..{fmt_rate(t['max'])}",
            fmt_rate(base["median"]),
            fmt_ratio(t["median"] / base["median"]),
            last,
        ]

    one, sk = r["engine_1_thread"], r["engine_skewed"]
    rows.append(
        engine_row(f"{one['streams']:,} (1 thread)", f"{one['batch_ticks']:,}", one,
                   f"{one['model_seconds_share']['median'] * 100:.0f}%")
    )  # fmt: skip
    rows.append(
        engine_row(f"{sk['streams']:,} skewed",
                   f"{sk['batch_ticks']:,} ({sk['hot_share'] * 100:.0f}% one stream)", sk,
                   f"{sk['waves']:,} waves")
    )  # fmt: skip
    lines.append(
        table(
            [
                "streams",
                "batch ticks",
                "engine ticks/s",
                "range",
                "per-tick ticks/s",
                "engine/per-tick",
                "model_seconds share",
            ],
            rows,
        )
    )
    t = r["targets"]
    lines.append("")
    lines.append(
        "targets @10k streams: engine >= 300,000 ticks/s: "
        f"{fmt_rate(t['engine_ticks_per_s_at_10k']['value'] or float('nan'))} "
        f"{verdict(t['engine_ticks_per_s_at_10k']['met'])}; skewed >= 100,000 ticks/s: "
        f"{fmt_rate(t['engine_skewed_ticks_per_s_at_10k']['value'])} "
        f"{verdict(t['engine_skewed_ticks_per_s_at_10k']['met'])}; engine/per-tick >= 50x: "
        f"{fmt_ratio(t['ratio_vs_per_tick_at_10k']['value'] or float('nan'))} "
        f"{verdict(t['ratio_vs_per_tick_at_10k']['met'])}"
    )
    c = r["combination"]
    lines.append(
        f"served mix + bounds vs model alone (forecast.combine: false), same batches, "
        f"{c['streams']:,} streams: uniform {fmt_rate(c['uniform']['on']['median'])} vs "
        f"{fmt_rate(c['uniform']['off']['median'])} ticks/s = "
        f"{c['uniform']['ratio']['median']:.2f}x (target >= 0.85x: "
        f"{verdict(t['combination_ratio_at_10k']['met'])}); skewed "
        f"{fmt_rate(c['skewed']['on']['median'])} vs {fmt_rate(c['skewed']['off']['median'])} = "
        f"{c['skewed']['ratio']['median']:.2f}x"
    )
    b = r["breakdown"]
    lines.append("")
    lines.append(
        table(
            ["part of Engine.process", "us/tick", "share"],
            [[k, f"{v:.2f}", f"{b['share'][k] * 100:.0f}%"] for k, v in b["us_per_tick"].items()]
            + [["total", f"{b['wall_s'] / b['ticks'] * 1e6:.2f}", "100%"]],
            title=f"where Engine.process time goes @{b['streams']:,} streams "
            f"(ForecastBatch.model_seconds = {b['model_seconds_reported'] / b['wall_s'] * 100:.0f}%"
            " of it: normalizer + model.step + _score + wave rest)",
        )
    )
    c = r["codec"]

    def codec_row(name: str, key: str, base_name: str, base_key: str) -> list[str]:
        return [
            name,
            fmt_rate(c[key]["records_per_s"]["median"]),
            f"{c[key]['us_per_record']:.2f}",
            base_name,
            f"{c[base_key]['us_per_record']:.2f}",
            fmt_ratio(c[key]["us_per_record"] / c[base_key]["us_per_record"]),
        ]

    lines.append("")
    lines.append(
        table(
            ["codec (per record)", "records/s", "us/record", "baseline", "baseline us", "ratio"],
            [
                codec_row(
                    "pipeline.ticks.decode_records", "decode_columnar", "json.loads", "json_loads"
                ),
                codec_row(
                    "pipeline.messages.decode (reference)", "decode", "json.loads", "json_loads"
                ),
                codec_row(
                    "ForecastEncoder.encode (H=24)",
                    "encode_batch_h24",
                    "json.dumps small dict",
                    "json_dumps_small",
                ),
                codec_row(
                    "encode_forecast (H=24, one record)",
                    "encode_forecast_h24",
                    "json.dumps small dict",
                    "json_dumps_small",
                ),
            ],
            title=f"decode/encode, {c['records']:,} records, information only",
        )
    )
    return "\n".join(lines)
