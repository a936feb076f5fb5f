"""Start-up of ``pipeline run``: broker (external or embedded), model, metrics, sample feed."""

from __future__ import annotations

import contextlib
import gc
import logging
import sys

import torch

from pipeline import metrics
from pipeline.config import Settings
from pipeline.daemon import Daemon
from pipeline.embedded import EmbeddedBroker
from pipeline.errors import ConfigError
from pipeline.model import load_model
from pipeline.simulate import SampleFeed

log = logging.getLogger(__name__)

# Collect the youngest generation every this many net container allocations (CPython: 700).
# A micro-batch allocates tens of thousands of short-lived tuples and lists (records, headers);
# at 700 the collector ran dozens of times per batch and cost ~8 µs per tick (decisions.md #26).
GC_GEN0_THRESHOLD = 20_000


def run_daemon(settings: Settings) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the process exit code."""
    torch.set_num_threads(settings.model.torch_threads)
    loaded = load_model(settings.model.path)
    with contextlib.ExitStack() as stack:
        embedded = settings.kafka.bootstrap_servers is None
        if embedded:
            broker = stack.enter_context(EmbeddedBroker())
            # Tansu holds a group join for ~session_timeout/2: short timeouts start in ~1 s.
            kafka = settings.kafka.model_copy(
                update={
                    "bootstrap_servers": broker.bootstrap_servers,
                    "session_timeout_ms": min(settings.kafka.session_timeout_ms, 2000),
                    "heartbeat_interval_ms": min(settings.kafka.heartbeat_interval_ms, 500),
                }
            )
            settings = settings.model_copy(update={"kafka": kafka})
        log.info("event=settings %s", settings.masked())
        daemon = Daemon(settings, loaded)
        _serve_metrics(settings, daemon.health)
        daemon.install_signal_handlers()
        feed_on = settings.sample_feed.enabled
        if feed_on or (feed_on is None and embedded):
            from pipeline.kafka_admin import ensure_topics

            kafka = settings.kafka
            ensure_topics(kafka, [kafka.input_topic, kafka.output_topic, kafka.dlq_topic])
            sf = settings.sample_feed
            feed = SampleFeed(
                kafka.bootstrap_servers or "", kafka.input_topic, sf.streams, sf.rate, sf.seed
            )
            feed.start()
            stack.callback(feed.stop)
        _announce(settings, embedded)
        tune_gc()
        daemon.run()
    return 0


def tune_gc() -> None:
    """Fewer young collections (GC_GEN0_THRESHOLD), and what start-up loaded (torch, the
    model, numpy) moved out of the collector's sight: it lives as long as the process."""
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
    gc.freeze()


def _serve_metrics(settings: Settings, health: metrics.Health) -> None:
    m = settings.metrics
    try:
        metrics.serve(m.host, m.port, health)
    except OSError as exc:
        raise ConfigError(
            f"metrics port {m.port} on {m.host} is not available ({exc.strerror}); pass "
            "--metrics-port with a free port, or 0 to disable metrics",
            field="metrics.port",
        ) from exc


def _announce(settings: Settings, embedded: bool) -> None:
    k, m = settings.kafka, settings.metrics
    lines = [
        f"pipeline: consuming {k.input_topic!r} on {k.bootstrap_servers}"
        + (" (embedded Tansu broker, memory only)" if embedded else ""),
        f"  forecasts -> {k.output_topic!r}, dead letters -> {k.dlq_topic!r}",
    ]
    if m.port:
        lines.append(f"  metrics:   http://127.0.0.1:{m.port}/metrics")
    lines.append(f"  subscribe: pipeline tail --bootstrap-servers {k.bootstrap_servers}")
    lines.append("  stop:      Ctrl-C (flushes and commits)")
    print("\n".join(lines), file=sys.stderr, flush=True)
