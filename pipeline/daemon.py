"""The daemon loop: poll → decode → engine → produce → flush → commit, and nothing else.

One poll is one micro-batch. Offsets are committed only after every forecast and dead letter of
the batch is acknowledged (at-least-once). SIGTERM/SIGINT finish the batch in hand, flush, commit
and exit 0.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
import time
from types import FrameType

from pipeline import metrics
from pipeline.backoff import Backoff
from pipeline.checkpoint import StateKeeper
from pipeline.config import Settings
from pipeline.engine import Engine
from pipeline.errors import (
    BrokerError,
    TransactionsUnsupported,
)
from pipeline.kafka_admin import ensure_topics, partitions_of, probe
from pipeline.messages import Reason
from pipeline.model import LoadedModel
from pipeline.quality import Quality
from pipeline.reload import ModelWatcher, reload_model
from pipeline.sink import AtLeastOnceSink, ExactlyOnceSink
from pipeline.source import Source
from pipeline.transaction import Totals, Transaction

log = logging.getLogger(__name__)

LAG_INTERVAL_S = 1.0
TOPIC_CHECK_INTERVAL_S = 5.0
MAX_BACKOFF_S = 15.0
PROGRESS_INTERVAL_S = 10.0
FIRST_PROGRESS_S = 3.0  # the first progress line comes early so a new user sees forecasts


class Daemon:
    """Wires source, engine and sink; owns the loop, the signals and the metrics updates."""

    def __init__(self, settings: Settings, loaded: LoadedModel) -> None:
        self.settings = settings
        self.engine = Engine(
            loaded,
            late_policy=settings.input.late_policy,
            combine=settings.forecast.combine_config(),
            combining=settings.forecast.combine,
        )
        self.quality = Quality()
        self.health = metrics.Health()
        self.stop_event = threading.Event()
        self.totals = Totals()
        self._next_lag = 0.0
        self._next_topic_check = time.monotonic() + TOPIC_CHECK_INTERVAL_S
        self._next_progress = time.monotonic() + FIRST_PROGRESS_S
        self.source: Source | None = None
        self.sink: AtLeastOnceSink | ExactlyOnceSink | None = None
        self.keeper = StateKeeper(settings, self.engine.store)
        self.exactly_once = settings.kafka.processing_guarantee == "exactly_once"
        self.unit = Transaction(
            settings,
            self.engine,
            self.keeper,
            self.stop_event,
            quality=self.quality,
            totals=self.totals,
        )
        self._to_restore: set[int] = set()  # assigned partitions paused until state is restored
        # Set while the group owes this member an assignment (after a revoke, or since joining).
        self._awaiting_assignment_since: float | None = None
        self.model_watch = ModelWatcher(loaded.path, settings.model.watch_seconds)

    def request_stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        if not self.stop_event.is_set():
            log.info("event=stopping signal=%s", signal.Signals(signum).name if signum else "call")
        self.stop_event.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)

    def request_reload(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        self.model_watch.request()

    def _maybe_reload(self, now: float) -> None:
        """Reload on SIGHUP, or when the model file changed (pipeline/reload.py)."""
        if not self.model_watch.due(now):
            return
        self.unit.commit()  # the undo log cannot undo a reload: commit before it
        if reload_model(self.engine, self.model_watch.path):
            self._publish_model_info()

    def run(self) -> None:
        """Run until :meth:`request_stop`; always flushes, commits and closes on the way out."""
        kafka = self.settings.kafka
        meta = self.engine.meta
        self._publish_model_info()
        self._zero_counters()
        if not self._connect():
            return
        log.info(
            "event=started input=%s output=%s dlq=%s group=%s model=%s",
            kafka.input_topic,
            kafka.output_topic,
            kafka.dlq_topic,
            kafka.group_id,
            meta.version,
        )
        try:
            while not self.stop_event.is_set():
                self.step(timeout_ms=200)
        except BrokerError as exc:
            if not self.stop_event.is_set():
                raise
            # A stop came while a commit was still retrying its sends: nothing is lost (the
            # offsets were not committed; the records come again to whoever reads next).
            log.warning("event=stopped_before_commit error=%s", exc)
        finally:
            self._close()

    def _zero_counters(self) -> None:
        """Export labelled counters at 0 from the start: rate() ignores a series' first sample,
        so a counter born at its first increment would hide that increment."""
        kafka = self.settings.kafka
        metrics.TICKS.labels(kafka.input_topic)
        metrics.FORECASTS.labels(kafka.output_topic)
        for reason in Reason:
            metrics.DEAD_LETTERS.labels(reason.value)
        for outcome in ("committed", "aborted"):
            metrics.TRANSACTIONS.labels(outcome)
        for outcome in ("kept_state", "rewarmed", "failed"):
            metrics.MODEL_RELOADS.labels(outcome)

    def _publish_model_info(self) -> None:
        meta = self.engine.meta
        metrics.MODEL_INFO.info(
            {
                "version": meta.version,
                "name": meta.name,
                "cell": meta.config.cell,
                "horizon": str(meta.config.horizon),
                "config_hash": self.settings.fingerprint(),
            }
        )

    def _connect(self) -> bool:
        """Reach the broker, create topics, build source and sink; retry with backoff.

        Returns False if a stop was requested before the broker could be reached.
        """
        kafka = self.settings.kafka
        backoff = Backoff(self.stop_event, first_s=1.0, max_s=MAX_BACKOFF_S)
        while not self.stop_event.is_set():
            try:
                probe(kafka)
                if kafka.create_topics:
                    ensure_topics(kafka, self._topics())
                    self._ensure_changelog()
                self.sink = self.unit.sink = self._make_sink()
                self.source = self.unit.source = self._make_source()
                return True
            except BrokerError as exc:
                delay = backoff.fail()
                metrics.BROKER_RETRIES.inc()
                log.warning(
                    "event=broker_unreachable attempt=%d retry_in_s=%.1f bootstrap=%s error=%s",
                    backoff.failures, delay, kafka.bootstrap_servers, exc,
                )  # fmt: skip
                if self.sink is not None:
                    self.sink.close()
                    self.sink = self.unit.sink = None
                backoff.wait(delay)
        return False

    def _make_source(self) -> Source:
        source = Source(
            self.settings.kafka,
            features=self.engine.meta.features,
            max_record_bytes=self.settings.input.max_record_bytes,
            positive=self.engine.target if self.engine.meta.target_transform == "log" else None,
            on_assigned=self._on_assigned,
            on_revoked=self._on_revoked,
        )
        self._awaiting_assignment_since = time.monotonic()
        return source

    def _check_rejoin(self, now: float) -> None:
        """Recreate the consumer if the group has owed us an assignment for too long.

        After a Tansu restart the group sometimes never answers the rejoin (partitions revoked,
        no assignment, no error, for minutes). A new member joins cleanly. An empty assignment
        (more members than partitions) still arrives through ``on_assigned`` and does not count.
        """
        since = self._awaiting_assignment_since
        limit_s = self.settings.kafka.rejoin_timeout_ms / 1000
        if since is None or now - since < limit_s:
            return
        assert self.source is not None
        waited = now - since
        log.warning("event=group_rejoin_stalled waited_s=%.1f action=recreate_consumer", waited)
        metrics.REJOINS_FORCED.inc()
        self._on_revoked(self.source.assignment())
        self.source.close()
        backoff = Backoff(self.stop_event, first_s=1.0, max_s=MAX_BACKOFF_S)
        while not self.stop_event.is_set():
            try:
                self.source = self.unit.source = self._make_source()
                return
            except BrokerError as exc:
                delay = backoff.fail()
                log.warning("event=consumer_recreate_failed attempt=%d retry_in_s=%.1f error=%s",
                            backoff.failures, delay, exc)  # fmt: skip
                backoff.wait(delay)

    def _make_sink(self) -> AtLeastOnceSink | ExactlyOnceSink:
        kafka = self.settings.kafka
        changelog = self.settings.changelog_topic() if self.settings.state.changelog else None
        if self.exactly_once:
            instance = kafka.instance_id or socket.gethostname()
            txn_id = f"{kafka.group_id}-{instance}"
            try:
                sink = ExactlyOnceSink(
                    kafka, self.stop_event, transactional_id=txn_id, changelog_topic=changelog
                )
                metrics.GUARANTEE.info({"guarantee": "exactly_once", "transactional_id": txn_id})
                log.info("event=exactly_once transactional_id=%s", txn_id)
                return sink
            except TransactionsUnsupported as exc:
                log.warning("event=transactions_unsupported fallback=at_least_once error=%s", exc)
                self.exactly_once = False
        metrics.GUARANTEE.info({"guarantee": "at_least_once", "transactional_id": ""})
        return AtLeastOnceSink(kafka, self.stop_event, changelog_topic=changelog)

    def _ensure_changelog(self, partitions: int | None = None) -> None:
        """The changelog gets as many partitions as the input (co-partitioning), compacted."""
        if not self.settings.state.changelog:
            return
        kafka = self.settings.kafka
        partitions = partitions or partitions_of(kafka, kafka.input_topic) or kafka.partitions
        ensure_topics(
            kafka, [self.settings.changelog_topic()], partitions, {"cleanup.policy": "compact"}
        )

    def _topics(self) -> list[str]:
        kafka = self.settings.kafka
        return [kafka.input_topic, kafka.output_topic, kafka.dlq_topic]

    def _watch_topics(self) -> None:
        """Create topics again if they vanished (a memory-only broker restarted)."""
        assert self.source is not None
        known = self.source.topics()
        missing = [t for t in self._topics() if known is not None and t not in known]
        if not missing:
            return
        log.warning("event=topics_missing topics=%s action=create", ",".join(missing))
        try:
            created = ensure_topics(self.settings.kafka, missing)
            # A temporary consumer here (partitions_of) stalled the group's rejoin on Tansu.
            input_created = self.settings.kafka.input_topic in created
            self._ensure_changelog(self.settings.kafka.partitions if input_created else None)
            if input_created:
                # Fresh metadata now: a group that rejoined while the topic was missing holds an
                # empty assignment until the client's next refresh (5 min by default in both
                # clients); seeing the partitions makes it rebalance.
                self.source.topics()
        except BrokerError as exc:
            log.warning("event=topics_recreate_failed error=%s", exc)
            return
        metrics.TOPICS_RECREATED.inc(len(created))

    def step(self, timeout_ms: int) -> int:
        """One poll: its micro-batch joins the open transaction, committed when due; returns
        the number of input records handled."""
        assert self.source is not None and self.sink is not None
        unit = self.unit
        polled = self.source.poll(min(timeout_ms, unit.time_left_ms()))
        now = time.monotonic()
        self.health.loop_at = self.health.poll_ok_at = now
        if now >= self._next_lag:
            self._update_lag()
            self._next_lag = now + LAG_INTERVAL_S
        if self.settings.kafka.create_topics and now >= self._next_topic_check:
            self._watch_topics()
            self._next_topic_check = now + TOPIC_CHECK_INTERVAL_S
        if polled.skipped:
            metrics.REDELIVERED.inc(polled.skipped)
        self._maybe_reload(now)
        self._check_rejoin(now)
        if self._to_restore:
            unit.commit()  # restored state must not enter the open transaction's undo log
            self._restore_pending()
        if polled:
            unit.add(polled)
        unit.commit_if_due()
        if now >= self._next_progress:
            self._log_progress()
            self._next_progress = now + PROGRESS_INTERVAL_S
        return len(polled)

    def _restore(self, committed: dict[int, int]) -> None:
        if not self.settings.state.changelog:
            return
        self.health.restoring = True
        try:
            report = self.keeper.restore(committed)
        finally:
            self.health.restoring = False
        log.info(
            "event=state_restored partitions=%s streams=%d records=%d cold_hidden=%d unusable=%d "
            "seconds=%.3f",
            ",".join(map(str, report.partitions)), report.streams, report.records,
            report.cold_hidden, report.unusable, report.seconds,
        )  # fmt: skip

    def _update_lag(self) -> None:
        assert self.source is not None
        topic = self.settings.kafka.input_topic
        for partition, lag in self.source.lag().items():
            metrics.LAG.labels(topic, str(partition)).set(lag)
        metrics.STATE_BYTES.set(self.engine.store.state_bytes())

    def _log_progress(self) -> None:
        t = self.totals
        last = " ".join(f"{k}={v}" for k, v in t.last.items())
        log.info(
            "event=progress consumed=%d forecasts=%d dead_letters=%d streams=%d %s"
            "last_forecast: %s",
            t.consumed,
            t.forecasts,
            t.dead_letters,
            len(self.engine.store),
            self._quality_summary(),
            last or "none",
        )

    def _quality_summary(self) -> str:
        """``skill=`` (recent served MAE / last-value MAE: below 1, the forecaster helps) and
        ``coverage=`` (recent share of actuals inside the step-1 bounds), once known."""
        q = self.quality
        parts = []
        if q.mae is not None and q.base:
            parts.append(f"skill={q.mae / q.base:.3f}")
        first = q.coverage.get("1")  # the first horizon group: step 1
        if first is not None:
            parts.append(f"coverage={first:.2f}")
        return "".join(p + " " for p in parts)

    def _on_assigned(self, partitions: list[int]) -> None:
        """Pause ``partitions`` until their streams' state is restored (by the loop).

        kafka-python runs this on its IO thread, where no blocking call is allowed, so the
        restore itself happens in :meth:`_restore_pending` right after the poll returns.
        """
        metrics.REBALANCES.inc()
        self._awaiting_assignment_since = None
        log.info("event=partitions_assigned partitions=%s", ",".join(map(str, partitions)))
        topic = self.settings.kafka.input_topic
        for p in partitions:
            for outcome in ("forecast", "dead_letter", "dropped"):
                metrics.RECORDS.labels(topic, str(p), outcome)
        if partitions and self.source is not None and self.settings.state.changelog:
            self.source.pause(partitions)
            self._to_restore.update(partitions)
            self.health.restoring = True
        metrics.ASSIGNED.set(len(self.source.assignment()) if self.source else len(partitions))
        self.health.assigned = True

    def _restore_pending(self) -> None:
        assert self.source is not None
        partitions = sorted(self._to_restore & set(self.source.assignment()))
        if partitions:
            try:
                self._restore(self.source.committed(partitions))
            except BrokerError as exc:  # stay paused; the next loop tries again
                log.warning("event=restore_failed partitions=%s error=%s", partitions, exc)
                self.stop_event.wait(1.0)
                return
            self.source.resume(partitions)
        self._to_restore.clear()
        self.health.restoring = False

    def _on_revoked(self, partitions: list[int]) -> None:
        """Commit the open transaction (its offsets may belong to another member from the next
        generation on), then drop the revoked partitions' streams."""
        topic = self.settings.kafka.input_topic
        if self.unit.source is not None and self.unit.uncommitted:
            log.info("event=commit_on_revoke batches=%d", self.unit.open_batches)
            try:
                self.unit.commit(in_rebalance=True)
            except BrokerError as exc:  # at-least-once flush interrupted by a stop
                log.warning("event=commit_on_revoke_failed error=%s", exc)
        # The rejoin watchdog waits only when this leaves the member with nothing. Under the
        # cooperative protocol a member that gives up some partitions, or none (kafka-python
        # revokes an empty set at each rebalance and may call back no assignment at all),
        # keeps working and is owed no answer.
        kept = set(self.source.assignment()) - set(partitions) if self.source else set()
        if partitions and not kept and self._awaiting_assignment_since is None:
            self._awaiting_assignment_since = time.monotonic()
        if self.source is not None:
            self.source.forget(partitions)
        self._to_restore.difference_update(partitions)
        # Dropped even without a changelog: another member owns these streams now, and state
        # kept here would be stale if they came back (and would grow without bound if not).
        dropped = self.keeper.drop(partitions)
        metrics.ACTIVE_STREAMS.set(len(self.engine.store))
        for p in partitions:
            # KeyError: never exported, no lag reading arrived while it was assigned.
            with contextlib.suppress(KeyError):
                metrics.LAG.remove(topic, str(p))
        log.info(
            "event=partitions_revoked partitions=%s streams_dropped=%d",
            ",".join(map(str, partitions)), dropped,
        )  # fmt: skip

    def _close(self) -> None:
        try:
            if self.sink is not None and self.source is not None:
                self.unit.commit()
        except BrokerError as exc:
            log.warning("event=final_flush_failed error=%s", exc)
        finally:
            if self.source is not None:
                self.source.close()
            if self.sink is not None:
                self.sink.close()
        t = self.totals
        log.info(
            "event=stopped consumed=%d forecasts=%d dead_letters=%d batches=%d",
            t.consumed,
            t.forecasts,
            t.dead_letters,
            t.batches,
        )
