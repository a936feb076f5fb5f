"""Part (b): end to end through an embedded Tansu broker, the daemon beside a bare passthrough.

Both systems run as subprocesses on the same broker, one after the other, each with its own
topics (6 partitions) and consumer group:

- ``daemon``: ``pipeline run`` (the real CLI) with fast group timings from the environment;
- ``passthrough``: :mod:`benchmarks.passthrough`, the same client settings and loop shape.

Paced run: a probe (one tick per stream) proves the group has joined and warms stream state; then
:mod:`benchmarks.loadgen` (its own process) offers ``rate`` ticks/s for ``warmup + duration`` s
with ``ts`` = wall-clock send time; a reader in this process consumes the output topic
(read_committed) and records ``receive time - ts`` for ticks sent in the measured window.

Saturation run: ``preload`` ticks are produced first, then the system starts and drains them. The
drain rate is taken from the output records' CreateTime (set by the system at ``send()``) between
the 10th and 90th percentile record, which excludes start-up and the last partial batch; the
committed offsets are sampled too. Latency there is backlog age, not service time.

Generator, reader, system and broker share this machine's cores: every figure is for that setup.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from pipeline.config import KafkaSettings
from pipeline.embedded import EmbeddedBroker
from pipeline.kafka_admin import ensure_topics

from . import loadgen
from .report import fmt_ms, fmt_rate, fmt_ratio, median, percentile, table, verdict

REPO = Path(__file__).resolve().parent.parent
SYSTEMS = ("daemon", "passthrough")
# The peer (benchmarks/quix_peer.py) runs from its own environment, made by `make bench-quix`.
QUIX_PYTHON = REPO / ".venv-quix" / "bin" / "python"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class E2EConfig:
    streams: int = 1_000
    rate: float = 5_000.0
    # More paced runs, shorter (issue 12: latency at 1k and 20k, CPU per 1,000 ticks at 1k).
    other_rates: tuple[float, ...] = (1_000.0, 20_000.0)
    other_duration_s: float = 10.0
    warmup_s: float = 3.0
    duration_s: float = 20.0
    subwindows: int = 5
    tail_s: float = 10.0  # after the generator stops, wait this long for the last outputs
    preload: int = 100_000
    sat_repeats: int = 2
    partitions: int = 6
    profile: bool = False
    # Both systems use this Kafka client (kafka.client; the passthrough's --client).
    client: str = "kafka-python"
    # Also drain with the Quix Streams peer app, if .venv-quix exists (saturation only).
    quix: bool = True
    daemon_env: dict[str, str] = field(default_factory=dict)
    log_dir: Path = field(default_factory=lambda: REPO / "out" / "bench-logs")

    @classmethod
    def quick(cls) -> E2EConfig:
        return cls(
            warmup_s=1.0,
            duration_s=5.0,
            subwindows=2,
            tail_s=5.0,
            preload=15_000,
            sat_repeats=1,
            other_rates=(),
        )


@dataclass(frozen=True)
class Topics:
    input: str
    output: str
    dlq: str


# ---------------------------------------------------------------------------------------------
# processes and CPU accounting


def proc_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) used so far by process ``pid``; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as fh:
        parts = [int(x) for x in fh.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return float(sum(parts) - idle), float(sum(parts))


def child_pid(name_part: str) -> int | None:
    """A child process of this one whose command name contains ``name_part``."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                raw = fh.read()
        except OSError:
            continue
        comm = raw[raw.find("(") + 1 : raw.rfind(")")]
        ppid = int(raw.rsplit(")", 1)[1].split()[1])
        if ppid == me and name_part in comm:
            return int(entry)
    return None


class CpuMonitor:
    """Samples the CPU time of named processes and of the whole machine."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {}
        self.samples: list[tuple[float, dict[str, float], float, float]] = []
        self._next = 0.0

    def sample(self, force: bool = False) -> None:
        now = time.time()
        if not force and now < self._next:
            return
        self._next = now + 0.25
        cpus = {}
        for name, pid in self.pids.items():
            value = proc_cpu(pid)
            if value is not None:
                cpus[name] = value
        busy, total = machine_cpu()
        self.samples.append((now, cpus, busy, total))

    def usage(self, start: float, end: float) -> dict[str, float]:
        """Cores used per process (and ``machine`` busy cores) between two wall times."""
        if len(self.samples) < 2:
            return {}
        a = min(self.samples, key=lambda s: abs(s[0] - start))
        b = min(self.samples, key=lambda s: abs(s[0] - end))
        wall = b[0] - a[0]
        if wall <= 0:
            return {}
        ncpu = os.cpu_count() or 1
        out = {k: (b[1][k] - a[1][k]) / wall for k in a[1] if k in b[1]}
        out["machine"] = (b[2] - a[2]) / max(b[3] - a[3], 1.0) * ncpu
        ours = sum(v for k, v in out.items() if k != "machine")
        out["other processes"] = max(out["machine"] - ours, 0.0)
        return out


def launch(
    kind: str,
    bootstrap: str,
    topics: Topics,
    group: str,
    log_path: Path,
    daemon_env: dict[str, str] | None = None,
    client: str = "kafka-python",
) -> Any:
    env = dict(os.environ)
    common = ["--bootstrap-servers", bootstrap, "--input-topic", topics.input,
              "--output-topic", topics.output, "--group-id", group]  # fmt: skip
    if kind == "daemon":
        script = Path(sys.executable).parent / "pipeline"
        exe = [str(script)] if script.exists() else [shutil.which("pipeline") or "pipeline"]
        cmd = [*exe, "run", *common, "--dlq-topic", topics.dlq, "--metrics-port", "0",
               "--no-sample-feed"]  # fmt: skip
        env["PIPELINE_KAFKA__SESSION_TIMEOUT_MS"] = "2000"
        env["PIPELINE_KAFKA__HEARTBEAT_INTERVAL_MS"] = "500"
        env["PIPELINE_KAFKA__CLIENT"] = client
        env.update(daemon_env or {})
    elif kind == "quix":
        cmd = [str(QUIX_PYTHON), "-m", "benchmarks.quix_peer", *common]
    else:
        cmd = [sys.executable, "-m", "benchmarks.passthrough", *common, "--client", client]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc


def stop(proc: Any, timeout: float = 20.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


def create_topics(bootstrap: str, names: list[str], partitions: int) -> None:
    settings = KafkaSettings(bootstrap_servers=bootstrap, partitions=partitions)
    ensure_topics(settings, names, partitions=partitions)


# ---------------------------------------------------------------------------------------------
# reading the output topic


class Reader:
    """Reads every partition of a topic from the start (read_committed), timing arrivals."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap.split(","),
            client_id="bench-reader",
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            fetch_max_wait_ms=100,
            max_poll_records=5000,
            auto_offset_reset="earliest",
        )
        self.consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        self.consumer.seek_to_beginning()
        self.ts: list[float] = []
        self.recv: list[float] = []
        self.created: list[float] = []

    def poll(self, timeout_ms: int = 100) -> int:
        batches = self.consumer.poll(timeout_ms=timeout_ms)
        now = time.time()
        n = 0
        for records in batches.values():
            for rec in records:
                self.ts.append(echoed_ts(rec.value))
                self.created.append(rec.timestamp / 1000.0)
            self.recv.extend([now] * len(records))
            n += len(records)
        return n

    def __len__(self) -> int:
        return len(self.ts)

    def close(self) -> None:
        self.consumer.close()


def echoed_ts(value: bytes) -> float:
    """The ``ts`` field of a JSON output record, without parsing the rest (forecasts are big:
    a full ``json.loads`` would charge the daemon's larger records more reader CPU)."""
    _, found, rest = value.partition(b'"ts":')
    if not found:
        return float(json.loads(value)["ts"])
    end = len(rest)
    for sep in (b",", b"}"):
        i = rest.find(sep)
        if 0 <= i < end:
            end = i
    return float(rest[:end])


def _wait_for(reader: Reader, count: int, proc: Any, timeout: float, mon: CpuMonitor) -> None:
    deadline = time.time() + timeout
    while len(reader) < count:
        if proc.poll() is not None:
            raise RuntimeError(f"system exited early with status {proc.returncode}")
        if time.time() > deadline:
            raise RuntimeError(f"timed out: {len(reader)} of {count} outputs after {timeout} s")
        reader.poll(100)
        mon.sample()


def latency_stats(lat: np.ndarray) -> dict[str, float]:
    s = np.sort(lat)
    return {
        "n": len(s),
        "p50_s": percentile(s, 50),
        "p90_s": percentile(s, 90),
        "p99_s": percentile(s, 99),
        "p999_s": percentile(s, 99.9),
        "max_s": float(s[-1]) if len(s) else float("nan"),
    }


# ---------------------------------------------------------------------------------------------
# the runs


def paced_run(
    kind: str, broker: EmbeddedBroker, cfg: E2EConfig, tag: str, broker_pid: int | None
) -> dict[str, Any]:
    bs = broker.bootstrap_servers
    topics = Topics(f"bench-{tag}-in", f"bench-{tag}-out", f"bench-{tag}-dlq")
    create_topics(bs, [topics.input, topics.output, topics.dlq], cfg.partitions)
    mon = CpuMonitor()
    if broker_pid:
        mon.pids["broker"] = broker_pid
    mon.pids["bench (reader)"] = os.getpid()
    reader = Reader(bs, topics.output, cfg.partitions)
    spawned = time.time()
    log_path = cfg.log_dir / f"{tag}.log"
    proc = launch(kind, bs, topics, f"bench-{tag}", log_path, cfg.daemon_env, cfg.client)
    mon.pids[kind] = proc.pid
    gen = None
    try:
        producer = loadgen.make_producer(bs)
        loadgen.produce_count(producer, topics.input, cfg.streams, cfg.streams, seed=1)
        producer.close()
        _wait_for(reader, cfg.streams, proc, 120.0, mon)
        first_output = min(reader.recv)
        gen_cmd = [
            sys.executable,
            "-m",
            "benchmarks.loadgen",
            "--bootstrap-servers",
            bs,
            "--topic",
            topics.input,
            "--streams",
            str(cfg.streams),
            "--rate",
            str(cfg.rate),
            "--warmup",
            str(cfg.warmup_s),
            "--duration",
            str(cfg.duration_s),
        ]
        gen_log = (cfg.log_dir / f"{tag}-loadgen.log").open("w")
        gen = subprocess.Popen(gen_cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=gen_log, text=True)
        gen_log.close()
        mon.pids["loadgen"] = gen.pid
        while gen.poll() is None:
            reader.poll(100)
            mon.sample()
            if proc.poll() is not None:
                raise RuntimeError(f"{kind} exited early with status {proc.returncode}")
        assert gen.stdout is not None
        summary = json.loads(gen.stdout.read().strip().splitlines()[-1])
        lo, hi = summary["measure_start"], summary["measure_end"]
        deadline = time.time() + cfg.tail_s
        while time.time() < deadline:
            ts = np.asarray(reader.ts)
            if int(((ts >= lo) & (ts < hi)).sum()) >= summary["measured"]:
                break
            reader.poll(100)
            mon.sample()
        mon.sample(force=True)
    finally:
        code = stop(proc)
        if gen is not None and gen.poll() is None:
            gen.kill()
        reader.close()
    ts, recv = np.asarray(reader.ts), np.asarray(reader.recv)
    inside = (ts >= lo) & (ts < hi)
    lat = recv[inside] - ts[inside]
    got = int(inside.sum())
    span = float(recv[inside].max() - recv[inside].min()) if got > 1 else float("nan")
    edges = np.linspace(lo, hi, cfg.subwindows + 1)
    sub_p99 = []
    for a, b in itertools.pairwise(edges):
        part = np.sort(recv[(ts >= a) & (ts < b)] - ts[(ts >= a) & (ts < b)])
        if len(part):
            sub_p99.append(percentile(part, 99))
    return {
        "system": kind,
        "topics": topics.__dict__,
        "startup_to_first_output_s": first_output - spawned,
        "offered_rate": cfg.rate,
        "achieved_offered_rate": summary["achieved_rate"],
        "generator_worst_behind_s": summary["worst_behind_s"],
        "measured_sent": summary["measured"],
        "measured_received": got,
        "throughput_per_s": (got - 1) / span if span > 0 else float("nan"),
        "latency": latency_stats(lat),
        "subwindow_p99_s": sub_p99,
        "cpu_cores": mon.usage(lo, hi),
        "exit_code": code,
    }


def preload(broker: EmbeddedBroker, cfg: E2EConfig, tag: str) -> dict[str, Any]:
    bs = broker.bootstrap_servers
    topic = f"bench-{tag}-in"
    create_topics(bs, [topic], cfg.partitions)
    producer = loadgen.make_producer(bs)
    try:
        summary = loadgen.produce_count(producer, topic, cfg.preload, cfg.streams, seed=2)
    finally:
        producer.close()
    summary["topic"] = topic
    return summary


def committed_total(admin: Any, group: str, topic: str) -> int:
    try:
        offsets = admin.list_group_offsets(group).get(group, {})
    except Exception:  # group not yet known to the coordinator
        return 0
    return sum(max(o.offset, 0) for tp, o in offsets.items() if tp.topic == topic)


def drain_run(
    kind: str,
    broker: EmbeddedBroker,
    cfg: E2EConfig,
    input_topic: str,
    tag: str,
    broker_pid: int | None,
    profile_to: Path | None = None,
) -> dict[str, Any]:
    bs = broker.bootstrap_servers
    topics = Topics(input_topic, f"bench-{tag}-out", f"bench-{tag}-dlq")
    create_topics(bs, [topics.output, topics.dlq], cfg.partitions)
    mon = CpuMonitor()
    if broker_pid:
        mon.pids["broker"] = broker_pid
    mon.pids["bench (reader)"] = os.getpid()
    admin = KafkaAdminClient(bootstrap_servers=bs.split(","), client_id="bench-admin")
    group = f"bench-{tag}"
    spawned = time.time()
    proc = launch(kind, bs, topics, group, cfg.log_dir / f"{tag}.log", cfg.daemon_env, cfg.client)
    mon.pids[kind] = proc.pid
    spy = None
    commits: list[tuple[float, int]] = []
    try:
        deadline = spawned + 300.0
        while True:
            time.sleep(0.2)
            now = time.time()
            done = committed_total(admin, group, input_topic)
            commits.append((now, done))
            mon.sample(force=True)
            if profile_to is not None and spy is None and done > 0:
                spy = _start_py_spy(proc.pid, profile_to)
            if done >= cfg.preload:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"{kind} exited early with status {proc.returncode}")
            if now > deadline:
                raise RuntimeError(f"{kind} drained {done} of {cfg.preload} in 300 s")
    finally:
        code = stop(proc)
        admin.close()
        if spy is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(timeout=30)
    first = next((t, c) for t, c in commits if c > 0)
    finished = commits[-1][0]
    # Every output record carries the CreateTime the system gave it at send().
    reader = Reader(bs, topics.output, cfg.partitions)
    try:
        idle_until = time.time() + 10.0
        while len(reader) < cfg.preload and time.time() < idle_until:
            if reader.poll(200):
                idle_until = time.time() + 5.0
    finally:
        reader.close()
    created = np.sort(np.asarray(reader.created))
    n = len(created)
    lo_i, hi_i = int(0.1 * (n - 1)), int(0.9 * (n - 1))
    span = float(created[hi_i] - created[lo_i]) if n > 10 else float("nan")
    age = np.asarray(reader.created) - np.asarray(reader.ts)
    return {
        "system": kind,
        "records": cfg.preload,
        "outputs_read": n,
        "throughput_per_s": (hi_i - lo_i) / span if span > 0 else float("nan"),
        "throughput_commits_per_s": (cfg.preload - first[1]) / (finished - first[0])
        if finished > first[0]
        else float("nan"),
        "startup_to_first_commit_s": first[0] - spawned,
        "drain_wall_s": finished - spawned,
        "backlog_age": latency_stats(age),
        "cpu_cores": mon.usage(first[0], finished),
        "exit_code": code,
        "profile": str(profile_to) if profile_to else None,
    }


def _start_py_spy(pid: int, path: Path) -> Any:
    exe = Path(sys.executable).parent / "py-spy"
    if not exe.exists():
        found = shutil.which("py-spy")
        if not found:
            print("  (py-spy not installed: no profile)", flush=True)
            return None
        exe = Path(found)
    cmd = [str(exe), "record", "--pid", str(pid), "--format", "raw", "--rate", "200"]
    cmd += ["--threads", "--idle", "--nonblocking", "--output", str(path)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


PROFILE_BUCKETS = (
    # (label, substring of a py-spy frame); the innermost (leaf-most) matching frame wins.
    ("json.loads", "loads (json/"),
    ("json.dumps", "dumps (json/"),
    ("decode: validation, Tick (excl. json)", "decode (pipeline/messages.py"),
    ("encode_forecast: dict, floats (excl. json)", "encode_forecast (pipeline/messages.py"),
    ("Sink.send_forecasts: headers, loop", "send_forecasts (pipeline/sink.py"),
    ("Engine.process", "process (pipeline/engine.py"),
    ("producer.send", "send (kafka/producer/kafka.py"),
    ("producer.flush (waiting for acks)", "flush (kafka/producer/kafka.py"),
    ("consumer.commit", "commit (kafka/consumer/group.py"),
    ("consumer.poll (fetch, parse, wait)", "poll (kafka/consumer/group.py"),
    ("Source.poll: loop, Source objects", "poll (pipeline/source.py"),
    ("Daemon._observe (metrics)", "_observe (pipeline/daemon.py"),
    ("Daemon._update_lag (metrics)", "_update_lag (pipeline/daemon.py"),
)


def summarize_profile(path: Path) -> dict[str, Any]:
    """Share of the main thread's samples (idle included) per bucket, from py-spy raw output."""
    counts: dict[str, int] = {}
    threads: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        stack, _, num = line.rpartition(" ")
        if not num.isdigit():
            continue
        n = int(num)
        frames = stack.split(";")
        main = any("<module>" in f for f in frames)
        who = "main" if main else "other threads"
        threads[who] = threads.get(who, 0) + n
        if not main:
            continue
        label = "other"
        for frame in reversed(frames):
            hit = next((lab for lab, key in PROFILE_BUCKETS if key in frame), None)
            if hit:
                label = hit
                break
        counts[label] = counts.get(label, 0) + n
    total = sum(counts.values()) or 1
    share = {k: v / total for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}
    return {"main_thread_samples": total, "main_thread_share": share, "threads": threads}


NAN = float("nan")


def _attempt(kind: str, tag: str, cfg: E2EConfig, paced: bool, fn: Any, *args: Any) -> Any:
    """Run one measurement; a system that fails is reported (with its log tail), not fatal."""
    try:
        return fn(*args)
    except Exception as exc:
        log_path = cfg.log_dir / f"{tag}.log"
        try:
            tail = log_path.read_text(errors="replace").splitlines()[-12:]
        except OSError:
            tail = []
        print(f"  e2e: {kind} FAILED: {exc} (log: {log_path})", flush=True)
        out: dict[str, Any] = {
            "system": kind,
            "error": f"{type(exc).__name__}: {exc}",
            "log": str(log_path),
            "log_tail": tail,
            "throughput_per_s": NAN,
            "cpu_cores": {},
            "exit_code": None,
        }
        empty = latency_stats(np.zeros(0))
        if paced:
            out.update(
                startup_to_first_output_s=NAN,
                offered_rate=cfg.rate,
                achieved_offered_rate=NAN,
                generator_worst_behind_s=NAN,
                measured_sent=0,
                measured_received=0,
                latency=empty,
                subwindow_p99_s=[],
            )
        else:
            out.update(
                records=cfg.preload,
                outputs_read=0,
                throughput_commits_per_s=NAN,
                startup_to_first_commit_s=NAN,
                drain_wall_s=NAN,
                backlog_age=empty,
                profile=None,
            )
        return out


def _target(value: float, target: float, at_least: bool) -> dict[str, Any]:
    met = None if value != value else (value >= target if at_least else value <= target)
    return {"target": target, "value": value, "met": met}


def run(cfg: E2EConfig) -> dict[str, Any]:
    stamp = time.strftime("%H%M%S")
    result: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()},
        "note": f"generator, reader, system and broker share {os.cpu_count()} cores",
        "paced": {},
        "saturation": {},
    }
    with EmbeddedBroker() as broker:
        broker_pid = child_pid("tansu")
        result["broker"] = broker.bootstrap_servers
        for kind in SYSTEMS:
            print(f"  e2e: {kind} at {cfg.rate:,.0f} ticks/s ...", flush=True)
            tag = f"{stamp}-{kind}-paced"
            result["paced"][kind] = _attempt(
                kind, tag, cfg, True, paced_run, kind, broker, cfg, tag, broker_pid
            )
            if kind == "daemon":
                result["daemon_settings"] = daemon_settings(cfg.log_dir / f"{tag}.log")
        inputs = {}
        for kind in SYSTEMS:
            print(f"  e2e: preloading {cfg.preload:,} ticks for {kind} ...", flush=True)
            inputs[kind] = preload(broker, cfg, f"{stamp}-{kind}-sat")
        result["preload"] = inputs
        result["paced_other"] = {}
        for rate in cfg.other_rates:
            at = replace(cfg, rate=rate, duration_s=cfg.other_duration_s)
            runs_at = {}
            for kind in SYSTEMS:
                print(f"  e2e: {kind} at {rate:,.0f} ticks/s ...", flush=True)
                tag = f"{stamp}-{kind}-paced-{rate:.0f}"
                runs_at[kind] = _attempt(
                    kind, tag, at, True, paced_run, kind, broker, at, tag, broker_pid
                )
            result["paced_other"][f"{rate:.0f}"] = runs_at
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in SYSTEMS}
        for rep in range(cfg.sat_repeats):
            for kind in SYSTEMS:
                print(f"  e2e: {kind} draining (repeat {rep + 1}) ...", flush=True)
                tag = f"{stamp}-{kind}-sat-r{rep}"
                topic = inputs[kind]["topic"]
                runs[kind].append(
                    _attempt(
                        kind, tag, cfg, False, drain_run, kind, broker, cfg, topic, tag, broker_pid
                    )
                )
        for kind in SYSTEMS:
            rates = [r["throughput_per_s"] for r in runs[kind]]
            result["saturation"][kind] = {
                "runs": runs[kind],
                "throughput_per_s_median": median(rates),
            }
        if cfg.quix and QUIX_PYTHON.exists():
            print("  e2e: quix peer draining ...", flush=True)
            tag = f"{stamp}-quix-sat"
            topic = inputs["daemon"]["topic"]  # another group reads the same ticks
            result["saturation"]["quix"] = _attempt(
                "quix", tag, cfg, False, drain_run, "quix", broker, cfg, topic, tag, broker_pid
            )
        if cfg.profile:
            profiles = {}
            for kind in SYSTEMS:
                print(f"  e2e: {kind} draining under py-spy (not used for figures) ...")
                path = cfg.log_dir / f"{stamp}-{kind}-drain.folded"
                tag = f"{stamp}-{kind}-sat-profile"
                topic = inputs[kind]["topic"]
                drain = _attempt(
                    kind,
                    tag,
                    cfg,
                    False,
                    drain_run,
                    kind,
                    broker,
                    cfg,
                    topic,
                    tag,
                    broker_pid,
                    path,
                )
                profiles[kind] = {
                    "throughput_per_s": drain["throughput_per_s"],
                    **summarize_profile(path),
                }
            result["profile"] = profiles
    d, p = result["paced"]["daemon"], result["paced"]["passthrough"]
    sd, sp = result["saturation"]["daemon"], result["saturation"]["passthrough"]
    result["targets"] = {
        # Issue 12: kafka-python >= 0.9x its passthrough; confluent-kafka >= 0.5x and 50k/s.
        "saturation_throughput_ratio": _target(
            sd["throughput_per_s_median"] / sp["throughput_per_s_median"],
            0.5 if cfg.client == "confluent-kafka" else 0.9,
            True,
        ),
        "paced_throughput_ratio": _target(d["throughput_per_s"] / p["throughput_per_s"], 0.9, True),
        "paced_p99_ratio": _target(d["latency"]["p99_s"] / p["latency"]["p99_s"], 1.5, False),
    }
    at_1k = result["paced_other"].get("1000")
    if at_1k:
        ratio = cpu_per_1k(at_1k["daemon"], "daemon") / cpu_per_1k(
            at_1k["passthrough"], "passthrough"
        )
        result["targets"]["cpu_per_1k_ratio_at_1k"] = _target(ratio, 1.5, False)
    if cfg.client == "confluent-kafka":
        result["targets"]["saturation_throughput"] = _target(
            sd["throughput_per_s_median"], 50_000.0, True
        )
    quix = result["saturation"].get("quix")
    if quix:
        result["targets"]["over_quix"] = _target(
            sd["throughput_per_s_median"] / quix["throughput_per_s"], 3.0, True
        )
    return result


def cpu_per_1k(run: dict[str, Any], kind: str) -> float:
    """CPU seconds the system used per 1,000 ticks it delivered (NaN if unknown)."""
    cores = run.get("cpu_cores", {}).get(kind)
    rate = run.get("throughput_per_s", NAN)
    if cores is None or not rate or rate != rate:
        return NAN
    return float(cores) / float(rate) * 1000.0


def render(r: dict[str, Any]) -> str:
    c = r["config"]
    d, p = r["paced"]["daemon"], r["paced"]["passthrough"]
    lines = [
        f"END TO END via embedded Tansu ({r['broker']}), {c['streams']:,} streams, "
        f"{c['partitions']} partitions, client {c.get('client', 'kafka-python')} for both "
        f"systems; NOTE: {r['note']} (CPU use below)",
    ]
    if c.get("daemon_env"):
        lines.append(f"daemon environment overrides: {c['daemon_env']}")
    if r.get("daemon_settings"):
        lines.append(
            "daemon as run (from its start-up log): "
            + ", ".join(f"{k}={v}" for k, v in r["daemon_settings"].items())
            + "; the passthrough is at-least-once with no state"
        )
    lines.append("")

    def ratio(a: float, b: float) -> str:
        return fmt_ratio(a / b) if b else "n/a"

    dl, pl = d["latency"], p["latency"]
    rows = [
        ["offered ticks/s (achieved)", *(fmt_rate(x["achieved_offered_rate"]) for x in (d, p)), ""],
        [
            "delivered records/s",
            fmt_rate(d["throughput_per_s"]),
            fmt_rate(p["throughput_per_s"]),
            ratio(d["throughput_per_s"], p["throughput_per_s"]),
        ],
        [
            "received / sent in window",
            f"{d['measured_received']:,}/{d['measured_sent']:,}",
            f"{p['measured_received']:,}/{p['measured_sent']:,}",
            "",
        ],
    ]
    for key, label in (("p50_s", "p50"), ("p90_s", "p90"), ("p99_s", "p99"), ("p999_s", "p99.9")):
        rows.append([f"latency {label}", fmt_ms(dl[key]), fmt_ms(pl[key]), ratio(dl[key], pl[key])])
    rows.append(["latency max", fmt_ms(dl["max_s"]), fmt_ms(pl["max_s"]), ""])
    rows.append(
        [
            f"p99 per {c['duration_s'] / c['subwindows']:.0f} s window, median [min..max]",
            _sub(d["subwindow_p99_s"]),
            _sub(p["subwindow_p99_s"]),
            "",
        ]
    )
    for who in (
        "daemon|passthrough",
        "broker",
        "loadgen",
        "bench (reader)",
        "other processes",
        "machine",
    ):
        dv = _cores(d, who, "daemon")
        pv = _cores(p, who, "passthrough")
        rows.append([f"CPU cores used: {who.replace('daemon|passthrough', 'system')}", dv, pv, ""])
    rows.append(
        [
            "start-up to first output",
            fmt_s(d["startup_to_first_output_s"]),
            fmt_s(p["startup_to_first_output_s"]),
            "",
        ]
    )
    lines.append(
        table(
            ["paced", "daemon", "passthrough", "daemon/passthrough"],
            rows,
            title=f"paced: {c['rate']:,.0f} ticks/s offered, {c['warmup_s']:.0f} s warm-up + "
            f"{c['duration_s']:.0f} s measured; latency = reader receive - tick ts (send time)",
        )
    )
    sd, sp = r["saturation"]["daemon"], r["saturation"]["passthrough"]
    rows = [
        [
            "drain records/s (CreateTime p10..p90), median",
            fmt_rate(sd["throughput_per_s_median"]),
            fmt_rate(sp["throughput_per_s_median"]),
            ratio(sd["throughput_per_s_median"], sp["throughput_per_s_median"]),
        ],
        [
            "  each repeat",
            ", ".join(fmt_rate(x["throughput_per_s"]) for x in sd["runs"]),
            ", ".join(fmt_rate(x["throughput_per_s"]) for x in sp["runs"]),
            "",
        ],
        [
            "drain records/s from committed offsets",
            ", ".join(fmt_rate(x["throughput_commits_per_s"]) for x in sd["runs"]),
            ", ".join(fmt_rate(x["throughput_commits_per_s"]) for x in sp["runs"]),
            "",
        ],
        [
            "start-up to first commit",
            ", ".join(fmt_s(x["startup_to_first_commit_s"]) for x in sd["runs"]),
            ", ".join(fmt_s(x["startup_to_first_commit_s"]) for x in sp["runs"]),
            "",
        ],
    ]
    for key, label in (("p50_s", "p50"), ("p99_s", "p99")):
        a = median([x["backlog_age"][key] for x in sd["runs"]])
        b = median([x["backlog_age"][key] for x in sp["runs"]])
        rows.append([f"backlog age {label} (not service latency)", fmt_ms(a), fmt_ms(b), ""])
    for who in ("daemon|passthrough", "broker", "other processes", "machine"):
        dv = _cores(sd["runs"][0], who, "daemon")
        pv = _cores(sp["runs"][0], who, "passthrough")
        rows.append([f"CPU cores used: {who.replace('daemon|passthrough', 'system')}", dv, pv, ""])
    pre = r["preload"]
    lines.append("")
    lines.append(
        table(
            ["saturation", "daemon", "passthrough", "daemon/passthrough"],
            rows,
            title=f"saturation: {c['preload']:,} ticks pre-loaded (at "
            f"{fmt_rate(pre['daemon']['rate'])} / {fmt_rate(pre['passthrough']['rate'])} "
            f"ticks/s), then drained; {c['sat_repeats']} repeat(s)",
        )
    )
    if r.get("paced_other"):
        rows = []
        for rate, runs_at in r["paced_other"].items():
            d2, p2 = runs_at["daemon"], runs_at["passthrough"]
            rows.append([
                f"{float(rate):,.0f}/s: delivered records/s",
                fmt_rate(d2["throughput_per_s"]), fmt_rate(p2["throughput_per_s"]),
                ratio(d2["throughput_per_s"], p2["throughput_per_s"]),
            ])  # fmt: skip
            for key, label in (("p50_s", "p50"), ("p99_s", "p99")):
                a, b = d2["latency"][key], p2["latency"][key]
                rows.append([f"{float(rate):,.0f}/s: latency {label}", fmt_ms(a), fmt_ms(b),
                             ratio(a, b)])  # fmt: skip
            a, b = cpu_per_1k(d2, "daemon"), cpu_per_1k(p2, "passthrough")
            rows.append([f"{float(rate):,.0f}/s: CPU s per 1,000 ticks", f"{a:.3f}", f"{b:.3f}",
                         ratio(a, b)])  # fmt: skip
        lines.append("")
        lines.append(
            table(
                ["paced, other rates", "daemon", "passthrough", "daemon/passthrough"],
                rows,
                title=f"paced at other rates, {c['warmup_s']:.0f} s warm-up + "
                f"{c['other_duration_s']:.0f} s measured each",
            )
        )
    t = r["targets"]
    lines.append("")
    lines.append(
        "targets: daemon/passthrough throughput at saturation >= "
        f"{t['saturation_throughput_ratio']['target']}: "
        f"{fmt_ratio(t['saturation_throughput_ratio']['value'])} "
        f"{verdict(t['saturation_throughput_ratio']['met'])}; at "
        f"{c['rate']:,.0f}/s >= 0.9: {fmt_ratio(t['paced_throughput_ratio']['value'])} "
        f"{verdict(t['paced_throughput_ratio']['met'])}; daemon/passthrough p99 at "
        f"{c['rate']:,.0f}/s <= 1.5 (issue 12): {fmt_ratio(t['paced_p99_ratio']['value'])} "
        f"{verdict(t['paced_p99_ratio']['met'])}"
        + (
            "; CPU per 1,000 ticks at 1,000/s <= 1.5x: "
            f"{fmt_ratio(t['cpu_per_1k_ratio_at_1k']['value'])} "
            f"{verdict(t['cpu_per_1k_ratio_at_1k']['met'])}"
            if "cpu_per_1k_ratio_at_1k" in t
            else ""
        )
    )
    if "saturation_throughput" in t:
        lines.append(
            "target: daemon at saturation >= 50,000 records/s (confluent-kafka): "
            f"{fmt_rate(t['saturation_throughput']['value'])} "
            f"{verdict(t['saturation_throughput']['met'])}"
        )
    quix = r["saturation"].get("quix")
    if quix:
        lines.append(
            f"peer: Quix Streams GRU app (benchmarks/quix_peer.py), same ticks drained: "
            f"{fmt_rate(quix['throughput_per_s'])} records/s, "
            f"{_cores(quix, 'daemon|passthrough', 'quix')} cores; daemon/quix "
            f"{fmt_ratio(t['over_quix']['value'])} (>= 3x, issue 12: "
            f"{verdict(t['over_quix']['met'])})"
        )
    failures = _failures(r)
    if failures:
        lines.append("")
        lines.extend(failures)
    for kind, prof in r.get("profile", {}).items():
        if not prof.get("main_thread_share"):
            continue
        lines.append("")
        lines.append(
            table(
                ["main-thread bucket", "share"],
                [[k, f"{v * 100:.1f}%"] for k, v in prof["main_thread_share"].items()],
                title=f"py-spy profile of the {kind} during a drain "
                f"({prof['main_thread_samples']:,} main-thread samples, run at "
                f"{fmt_rate(prof['throughput_per_s'])} records/s; not used for figures)",
            )
        )
    return "\n".join(lines)


def fmt_s(seconds: float) -> str:
    return "n/a" if seconds != seconds else f"{seconds:.1f} s"


def daemon_settings(log_path: Path) -> dict[str, str]:
    """Settings that shape the daemon's cost, read from its start-up log line (best effort)."""
    import re

    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return {}
    out = {}
    for key in ("processing_guarantee", "changelog", "torch_threads", "late_policy"):
        m = re.search(rf"'{key}': ([^,}}]+)", text)
        if m:
            out[key] = m.group(1).strip("'\" ")
    return out


def _failures(r: dict[str, Any]) -> list[str]:
    runs = [r["paced"][k] for k in SYSTEMS]
    runs += [x for k in SYSTEMS for x in r["saturation"][k]["runs"]]
    runs += [at[k] for at in r.get("paced_other", {}).values() for k in SYSTEMS]
    if "quix" in r["saturation"]:
        runs.append(r["saturation"]["quix"])
    lines = []
    for x in runs:
        if "error" in x:
            lines.append(f"FAILED {x['system']}: {x['error']} (log: {x['log']})")
            lines.extend(f"    | {t}" for t in x["log_tail"])
    return lines


def _sub(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{median(values) * 1000:,.0f} [{min(values) * 1000:,.0f}..{max(values) * 1000:,.0f}] ms"


def _cores(run: dict[str, Any], who: str, kind: str) -> str:
    key = kind if who == "daemon|passthrough" else who
    value = run.get("cpu_cores", {}).get(key)
    return "n/a" if value is None else f"{value:.2f}"
