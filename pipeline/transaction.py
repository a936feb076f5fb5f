"""The unit of commit: the micro-batches between two commits, and everything they owe.

A :class:`Transaction` takes polled micro-batches (:meth:`Transaction.add`) and owns what makes
them durable together: under exactly-once, one Kafka transaction with the forecasts, dead
letters, changelog records and input offsets of all its batches, and an in-memory undo log of
every stream they changed; under at-least-once, a flush of all sends and then an offset commit.
It applies the input policy (late, missing, rejected), writes each touched stream's snapshot
once per commit (not once per poll), and reports the committed batches to the metrics.

Cadence: a commit covers up to ``kafka.commit_interval_ms`` or ``kafka.commit_records``,
whichever comes first (as Kafka Streams' ``commit.interval.ms`` and Quix Streams' checkpoint
do); while the daemon is caught up (the last poll read its partitions to the high watermark,
:attr:`Polled.caught_up`) also as soon as ``kafka.commit_records_caught_up`` records are in.
Under exactly-once the forecasts are visible only after the commit, so at a steady rate the
interval is latency; during a backlog a commit per few polls would cost throughput instead
(decisions.md 33, 34). Small polls are gathered and run through the engine together once a
full poll's worth (``kafka.max_poll_records``) is there, the commit is due or near, or (only
while behind the high watermark) the first of them is ``GATHER_S`` (20 ms) old: their outputs
are invisible until the commit anyway, and each engine batch and each batch of sends has a
fixed cost (at 1k ticks/s a poll holds a few dozen records). A full poll (a backlog) is
processed at once: gathering several of them measured slower (decisions.md 28). While caught
up, small polls wait for the commit, which the caught-up bound keeps small (decisions.md 35).

Under exactly-once a cadence commit runs on the sink's call thread: the daemon polls and
decodes the next records meanwhile, and the commit is joined before they (or anything else) go
through the engine (decisions.md 41). A commit takes tens of milliseconds on Tansu, a fifth of
the wall time of a drain when it blocked the loop.

The daemon must call :meth:`Transaction.commit` before anything changes the store outside the
engine (rebalance, restore, model reload, shutdown): the undo log would not know those changes,
and offsets of a revoked partition must not be committed by its former owner.

If a commit fails, the state is rolled back in memory (O(streams touched)), owed evictions are
kept, the consumer seeks back to the first offsets of the aborted batches, and the next
transaction starts after a backoff (0.1 s doubling to 15 s). A fenced producer stops the daemon
(:class:`FencedError` propagates).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from pipeline import metrics
from pipeline.backoff import Backoff
from pipeline.checkpoint import StateKeeper
from pipeline.config import Settings
from pipeline.engine import Engine, ForecastBatch
from pipeline.errors import BrokerError, FencedError, TransactionFailed
from pipeline.messages import Reason, Rejection
from pipeline.quality import Quality
from pipeline.sink import AtLeastOnceSink, ExactlyOnceSink
from pipeline.source import Polled, Source
from pipeline.ticks import TickBatch

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 15.0
# What made a commit due (the label of pipeline_commits_total).
Trigger = Literal["interval", "records", "caught_up", "forced"]
# Small polls behind the high watermark wait in the transaction for at most this long before
# they are processed (and not at all in its last this-long before the commit; caught-up polls
# wait for the commit, decisions.md 35): long enough to turn a trickle of polls
# into a few engine batches per commit, short enough that the commit does not wait for much to
# be processed and delivered (what is processed early is sent while the transaction is open).
GATHER_S = 0.02
# The poll timeout while a commit is in flight: the commit (tens of ms) is joined at the next
# poll that brings records, or at the first poll to return after it finished.
IN_FLIGHT_POLL_MS = 10


@dataclass
class Totals:
    """Committed counts since start, for the progress log line and the shutdown summary."""

    consumed: int = 0
    forecasts: int = 0
    dead_letters: int = 0
    batches: int = 0
    commits: int = 0
    last: dict[str, object] = field(default_factory=dict)


@dataclass
class _Pending:
    """What the open transaction's batches will report once committed."""

    batches: int = 0
    records: int = 0
    forecasts: int = 0
    # Kafka timestamps (ms) of the forecast inputs, for the end-to-end latency at commit.
    timestamps: list[np.ndarray] = field(default_factory=list)
    outcomes: Counter[tuple[int, str]] = field(default_factory=Counter)  # (partition, outcome)
    reasons: Counter[str] = field(default_factory=Counter)
    errors: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    resets: int = 0
    # Per batch: forecast rows, then the combination figures of ForecastBatch (weight_sum,
    # interval_scored, interval_covered, width_sum).
    combination: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = field(
        default_factory=list
    )
    last: dict[str, object] = field(default_factory=dict)


@dataclass
class _InFlight:
    """A committing transaction (exactly-once, cadence commits): the sink commits it on its
    call thread while the daemon polls and decodes the next records."""

    pending: _Pending
    starts: dict[int, int]  # partition -> first offset, to rewind to if the commit fails
    trigger: Trigger
    started: float  # perf_counter() when the commit began


class Transaction:
    """Micro-batches in, committed outputs + state + offsets out (see the module docstring).

    ``source`` and ``sink`` are set by the daemon and replaced when it recreates them.
    """

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        keeper: StateKeeper,
        stop: threading.Event,
        *,
        quality: Quality | None = None,
        totals: Totals | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.keeper = keeper
        self.stop = stop
        self.quality = quality or Quality()
        self.totals = totals or Totals()
        self.source: Source | None = None
        self.sink: AtLeastOnceSink | ExactlyOnceSink | None = None
        kafka = settings.kafka
        self.interval_s = kafka.commit_interval_ms / 1000
        self.max_records = kafka.commit_records
        self.caught_up_records = min(kafka.commit_records_caught_up, kafka.commit_records)
        self.max_poll_records = kafka.max_poll_records
        # Consecutive failed transactions: 0.1 s, doubling, at most 15 s before the next one.
        self.backoff = Backoff(stop, first_s=0.1, max_s=MAX_BACKOFF_S)
        self._in_flight: _InFlight | None = None
        self._reset()

    def _reset(self) -> None:
        self.is_open = False
        self.opened_at = 0.0
        self._offsets: dict[int, int] = {}  # partition -> next offset to commit
        self._starts: dict[int, int] = {}  # partition -> first offset of the open transaction
        self._touched: dict[str, None] = {}  # insertion-ordered set of changed streams
        self._gathered: list[Polled] = []  # polled, not yet processed
        self._gathered_since = 0.0
        self._began = False  # the Kafka transaction (exactly-once) has begun
        self._caught_up = False  # the last poll added read its partitions to the end
        self._pending = _Pending()

    @property
    def open_batches(self) -> int:
        return self._pending.batches

    @property
    def uncommitted(self) -> bool:
        """Whether batches are open or their commit is still in flight (the daemon must call
        :meth:`commit` before a rebalance, restore, reload or shutdown in either case)."""
        return self.is_open or self._in_flight is not None

    @property
    def uncommitted_records(self) -> int:
        """Input records added and not yet committed (open or in flight)."""
        in_flight = self._in_flight.pending.records if self._in_flight is not None else 0
        return self._pending.records + in_flight

    # -- the cadence ----------------------------------------------------------------------------

    def due(self, now: float | None = None) -> Trigger | None:
        """What makes the open transaction due now (the cadence of the module docstring), or
        None if nothing does."""
        if not self.is_open:
            return None
        now = time.monotonic() if now is None else now
        records = self._pending.records
        if records >= self.max_records:
            return "records"
        if self._caught_up and records >= self.caught_up_records:
            return "caught_up"
        if now - self.opened_at >= self.interval_s:
            return "interval"
        return None

    def commit_if_due(self, now: float | None = None) -> bool:
        """Join a commit in flight if it has finished, then commit if the cadence says so; True
        if a commit was started (exactly-once: it may still be in flight) or made."""
        if self._in_flight is not None and self._settle(False, block=False) is None:
            return False
        trigger = self.due(now)
        return trigger is not None and self.commit(trigger=trigger, wait=False)

    def time_left_ms(self, now: float | None = None) -> int:
        """Milliseconds until the open transaction is due, or until a commit in flight is worth
        checking again (for the poll timeout)."""
        if self._in_flight is not None:
            return IN_FLIGHT_POLL_MS
        if not self.is_open:
            return 1 << 30
        now = time.monotonic() if now is None else now
        return max(int((self.opened_at + self.interval_s - now) * 1000), 0)

    # -- batches --------------------------------------------------------------------------------

    def add(self, polled: Polled) -> None:
        """Gather one polled micro-batch into the open transaction (opened here if needed);
        processes what is gathered once it is a full poll's worth or (behind the watermark)
        ``GATHER_S`` old or the commit is less than ``GATHER_S`` away, and commits when the
        cadence says so (module docstring)."""
        if not len(polled):
            return
        assert self.source is not None
        if self._in_flight is not None:  # the poll overlapped the commit: join it first
            self._settle(False, block=True)
        if self.source.stale(polled):  # a commit failed after the poll (reload, restore)
            self.source.give_back(polled)
            return
        now = time.monotonic()
        if not self.is_open:
            self.is_open = True
            self.opened_at = now
        if not self._gathered:
            self._gathered_since = now
        self._gathered.append(polled)
        self._offsets.update(polled.offsets)
        for p, o in polled.starts.items():
            self._starts.setdefault(p, o)
        self._pending.batches += 1
        self._pending.records += len(polled)
        self._caught_up = polled.caught_up
        trigger = self.due(now)
        if trigger is not None:
            self.commit(trigger=trigger, wait=False)
        elif (
            sum(map(len, self._gathered)) >= self.max_poll_records
            # Caught up, the commit comes at caught_up_records or the interval: wait for it.
            or (now - self._gathered_since >= GATHER_S and not self._caught_up)
            or self.opened_at + self.interval_s - now <= GATHER_S  # the commit is near
        ):
            self._process(False)  # False: could not begin; rewound, backed off, reset

    def _process(self, in_rebalance: bool) -> bool:
        """Begin the Kafka transaction and run everything gathered through the engine as one
        batch (wider waves than poll by poll: a poll is often one partition's records), sending
        its forecasts, dead letters and evictions. False if the transaction could not begin
        (the gathered records were rewound and, outside a rebalance, a backoff taken)."""
        assert self.sink is not None and self.source is not None
        gathered, self._gathered = self._gathered, []
        if not gathered:
            return True
        if self._began:
            self._run(gathered)
            return True
        if isinstance(self.sink, ExactlyOnceSink):
            try:
                self.sink.begin()
            except FencedError:
                raise
            except (BrokerError, TransactionFailed) as exc:
                log.warning("event=transaction_begin_failed error=%s action=rewind", exc)
                self.source.rewind_to(self._owned(self._starts, in_rebalance))
                self._reset()
                delay = self.backoff.fail()
                if not in_rebalance:
                    self.backoff.wait(delay)
                return False
            self.engine.store.track()
        self._began = True
        self._run(gathered)
        return True

    def _run(self, gathered: list[Polled]) -> None:
        """The gathered polls through the engine as one batch, and their outputs sent."""
        assert self.sink is not None
        started = time.perf_counter()
        sink = self.sink
        with_ticks = [p.ticks for p in gathered if len(p.ticks)]
        ticks = TickBatch.concat(with_ticks) if with_ticks else gathered[0].ticks
        batch = self.engine.process(ticks)
        rejections = [r for p in gathered for r in p.rejections]
        late_policy = self.settings.input.late_policy
        if len(batch.late_rows) and late_policy != "drop":
            rejections = rejections + [_late_rejection(batch, i) for i in batch.late_rows.tolist()]
            dropped = batch.missing_rows
        else:
            dropped = np.concatenate([batch.missing_rows, batch.late_rows])
        sink.send_forecasts(batch, self.engine.version)
        sink.send_dead_letters(rejections)
        self._touched.update(dict.fromkeys(batch.touched))
        last_read = {p: o - 1 for p, o in self._offsets.items()}
        sink.send_state(self.keeper.evictions(last_read))  # no changelog: evicts, sends nothing
        self._remember(batch, rejections, dropped)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        metrics.MODEL_SECONDS.observe(batch.model_seconds)
        metrics.BATCH_SIZE.observe(len(ticks) + len(rejections))

    def _owned(self, starts: dict[int, int], in_rebalance: bool) -> dict[int, int]:
        """``starts`` without the partitions no longer assigned (inside a rebalance: those
        restart from their committed offsets elsewhere)."""
        if not in_rebalance:
            return starts
        assert self.source is not None
        owned = set(self.source.assignment())
        return {p: o for p, o in starts.items() if p in owned}

    def _remember(
        self, batch: ForecastBatch, rejections: list[Rejection], dropped: np.ndarray
    ) -> None:
        """Keep what the metrics report once this batch is committed."""
        pending = self._pending
        pending.forecasts += len(batch)
        ticks = batch.input
        if len(batch):
            pending.timestamps.append(ticks.timestamp_ms[batch.rows])
            i = int(batch.rows[-1])
            pending.last = {
                "stream": ticks.stream[i],
                "value": float(ticks.values[i, self.engine.target]),
                "seq": int(batch.seq[-1]),
                "next": [float(f"{v:.6g}") for v in batch.forecast[-1, :3].tolist()],
                "warm": bool(batch.warm[-1]),
            }
        outcomes = pending.outcomes
        for outcome, parts in (
            ("forecast", ticks.partition[batch.rows]),
            ("dropped", ticks.partition[dropped]),
        ):
            values, counts = np.unique(parts, return_counts=True)
            for p, n in zip(values.tolist(), counts.tolist(), strict=True):
                outcomes[(p, outcome)] += n
        for rej in rejections:
            outcomes[(rej.source.partition, "dead_letter")] += 1
            pending.reasons[rej.reason.value] += 1
        if len(batch.error):
            pending.errors.append((batch.error, batch.persistence_error))
        if len(batch):
            pending.combination.append((len(batch), batch.weight_sum, batch.interval_scored,
                                        batch.interval_covered, batch.width_sum))  # fmt: skip
        pending.resets += batch.resets

    # -- commit / abort -------------------------------------------------------------------------

    def commit(
        self, *, in_rebalance: bool = False, trigger: Trigger = "forced", wait: bool = True
    ) -> bool:
        """Make the open transaction's batches durable; True if committed (or nothing open).
        ``trigger`` labels the commit in ``pipeline_commits_total``: the cadence's reason, or
        ``forced`` when the daemon commits before a rebalance, restore, reload or shutdown.
        A commit still in flight is joined first.

        Exactly-once with ``wait=False`` (the cadence's commits) and
        ``kafka.commit_in_background`` on: the Kafka commit runs on the
        sink's call thread and this returns True once it is started; the next :meth:`add`,
        :meth:`commit` or :meth:`commit_if_due` joins it (decisions.md 41). Nothing is processed
        or sent while it is in flight, so the next transaction's undo log starts after it.

        On failure the batches are rolled back and rewound (see the module docstring); inside
        a rebalance callback (``in_rebalance``) no backoff is taken and only partitions still
        assigned are rewound (the others restart from their committed offsets elsewhere).
        """
        if self._in_flight is not None:
            joined = self._settle(in_rebalance, block=True)
            assert not self.is_open  # nothing opens while a commit is in flight
            return bool(joined)
        if not self.is_open:
            return True
        assert self.sink is not None and self.source is not None
        if not self._process(in_rebalance):
            return False
        started = time.perf_counter()
        sink = self.sink
        if self.settings.state.changelog and self._touched:
            sink.send_state(self.keeper.records(list(self._touched)))
        if isinstance(sink, ExactlyOnceSink):
            in_flight = _InFlight(self._pending, self._starts, trigger, started)
            try:
                sink.start_commit(
                    {self.settings.kafka.input_topic: self._offsets}, self.source.group_metadata()
                )
            except TransactionFailed as exc:
                self._reset()
                self._roll_back(exc, in_flight, in_rebalance)
                return False
            self._in_flight = in_flight
            self._reset()
            if not wait and self.settings.kafka.commit_in_background:
                return True
            return bool(self._settle(in_rebalance, block=True))
        sink.flush()
        if not self.source.commit(self._offsets):
            metrics.COMMIT_FAILURES.inc()
        self._committed(self._pending, started, time.time(), trigger)
        self._reset()
        return True

    def _settle(self, in_rebalance: bool, block: bool) -> bool | None:
        """Join the commit in flight: True if it committed, False if it failed (rolled back and
        rewound as in :meth:`commit`), None if ``block`` is False and it is still running."""
        in_flight = self._in_flight
        assert in_flight is not None and isinstance(self.sink, ExactlyOnceSink)
        try:
            committed_at = self.sink.finish_commit(block)
        except TransactionFailed as exc:
            self._in_flight = None
            self._roll_back(exc, in_flight, in_rebalance)
            return False
        except BaseException:
            self._in_flight = None  # fenced (the daemon stops) or a bug: nothing to join
            raise
        if committed_at is None:
            return None
        self._in_flight = None
        self.engine.store.settle()
        metrics.TRANSACTIONS.labels("committed").inc()
        self._committed(in_flight.pending, in_flight.started, committed_at, in_flight.trigger)
        return True

    def _committed(
        self, pending: _Pending, started: float, committed_at: float, trigger: Trigger
    ) -> None:
        """What follows any successful commit: the keeper's and the backoff's bookkeeping and
        the metrics (``started``: perf_counter when the commit began)."""
        self.keeper.batch_committed()
        self.backoff.reset()
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
        self._report(pending, committed_at, trigger)

    def _roll_back(self, exc: TransactionFailed, failed: _InFlight, in_rebalance: bool) -> None:
        """The transaction aborted: undo its state changes and read its batches again."""
        assert self.source is not None
        streams = self.engine.store.rollback()
        self.keeper.batch_aborted()
        self.source.rewind_to(self._owned(failed.starts, in_rebalance))
        metrics.TRANSACTIONS.labels("aborted").inc()
        log.warning(
            "event=transaction_aborted error=%s action=roll_back streams=%d batches=%d",
            exc, streams, failed.pending.batches,
        )  # fmt: skip
        delay = self.backoff.fail()
        if not in_rebalance:  # no sleeping inside a rebalance callback
            self.backoff.wait(delay)

    def _report(self, pending: _Pending, committed_at: float, trigger: Trigger) -> None:
        """Metrics and totals of the committed batches (aborted ones are not counted);
        ``committed_at`` is the wall-clock time (s) the commit returned."""
        kafka = self.settings.kafka
        metrics.COMMITS.labels(trigger).inc()
        metrics.COMMIT_RECORDS.observe(pending.records)
        topic = kafka.input_topic
        metrics.TICKS.labels(topic).inc(pending.records)
        metrics.FORECASTS.labels(kafka.output_topic).inc(pending.forecasts)
        if pending.timestamps:
            stamps = np.concatenate(pending.timestamps)
            stamps = stamps[stamps >= 0]
            metrics.END_TO_END.observe_many(np.maximum(committed_at - stamps / 1000.0, 0.0))
        for (partition, outcome), n in pending.outcomes.items():
            metrics.RECORDS.labels(topic, str(partition), outcome).inc(n)
        for reason, n in pending.reasons.items():
            metrics.DEAD_LETTERS.labels(reason).inc(n)
        if pending.resets:
            metrics.STATE_RESETS.inc(pending.resets)
        for error, base in pending.errors:
            self.quality.observe(error, base)
        if self.engine.combining:
            members, groups = self.engine.members, self.engine.horizon_groups
            for figures in pending.combination:
                self.quality.observe_combination(members, groups, *figures)
        metrics.ACTIVE_STREAMS.set(len(self.engine.store))
        totals = self.totals
        totals.consumed += pending.records
        totals.forecasts += pending.forecasts
        totals.dead_letters += sum(pending.reasons.values())
        totals.batches += pending.batches
        totals.commits += 1
        if pending.last:
            totals.last = pending.last


def _late_rejection(batch: ForecastBatch, i: int) -> Rejection:
    """Input row ``i`` (a late tick) as a dead letter with its original bytes."""
    ticks = batch.input
    detail = f"ts {float(ticks.ts[i])} is older than the newest tick of stream {ticks.stream[i]!r}"
    return ticks.rejection(i, Reason.LATE, detail)
