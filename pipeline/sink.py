"""Writing results: forecasts, dead letters and per-stream state (the changelog).

:class:`Sink` queues the records (the same for both guarantees); each guarantee is its own
class, so each path reads straight through:

- :class:`AtLeastOnceSink`: sends are asynchronous; :meth:`~AtLeastOnceSink.flush` waits for
  every acknowledgement. If any send of the micro-batch failed (a broker restart, say), the
  producer is rebuilt and the whole batch is sent again until it goes through or the daemon is
  asked to stop; the daemon then commits the input offsets itself. A resent batch can duplicate
  records that did get through; they carry the same ``seq`` and readers drop them.
- :class:`ExactlyOnceSink` (a transactional id): :meth:`~ExactlyOnceSink.begin` opens a
  transaction, :meth:`~ExactlyOnceSink.commit` adds the consumer offsets to it and commits
  (or :meth:`~ExactlyOnceSink.start_commit` does so on a call thread while the caller polls the
  next records, and :meth:`~ExactlyOnceSink.finish_commit` joins it). Any failure aborts (or
  abandons a hung commit) and raises :class:`TransactionFailed`: the caller must rewind to the
  committed offsets and restore state. A fenced producer raises :class:`FencedError`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from pipeline import clients, metrics
from pipeline.backoff import Backoff
from pipeline.clients import ClientError, OutRecord, ProducerClient, StateRecord
from pipeline.config import KafkaSettings
from pipeline.engine import ForecastBatch
from pipeline.errors import BrokerError, FencedError, TransactionFailed, TransactionsUnsupported
from pipeline.messages import ForecastEncoder, Rejection

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 10.0


class Sink:
    """The producer and the records of the open micro-batch; a guarantee's subclass sends them
    durably (:class:`AtLeastOnceSink`, :class:`ExactlyOnceSink`)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        stop: threading.Event | None = None,
        *,
        changelog_topic: str | None = None,
    ) -> None:
        self.kafka = kafka
        self.output_topic = kafka.output_topic
        self.dlq_topic = kafka.dlq_topic
        self.changelog_topic = changelog_topic
        self.stop = stop or threading.Event()
        # The micro-batch's records since the last flush or commit (resent at least once;
        # only cleared exactly once, where an abort discards them).
        self._batch: list[OutRecord] = []
        self._batch_state: list[StateRecord] = []
        self._broken: str | None = None  # a send that raised: the batch must be resent
        self._encoder = ForecastEncoder()
        self.producer = self._new_producer()

    def _new_producer(self) -> ProducerClient:
        """The guarantee's producer on the configured client (pipeline.clients)."""
        raise NotImplementedError

    def _dispatch(self, records: Sequence[OutRecord]) -> None:
        """Hand ``records`` to the producer; a send that raises marks the batch for resending
        (at least once) or the transaction for an abort (exactly once). A record the client
        cannot queue: e.g. a partition its metadata does not know yet, a changelog recreated
        after a broker restart."""
        if self._broken is not None:
            return
        try:
            self.producer.send(records)
        except ClientError as exc:
            self._broken = str(exc)

    def send_forecasts(self, batch: ForecastBatch, model_version: str) -> None:
        """Queue one forecast record per row of ``batch``, keyed by stream, with the input
        record's partition and offset as headers."""
        if not len(batch):
            return
        ticks, rows = batch.input, batch.rows
        index = rows.tolist()
        streams = [ticks.stream[i] for i in index]
        keys = [ticks.key[i] for i in index]
        values = self._encoder.encode(
            streams,
            ticks.ts[rows],
            batch.seq,
            batch.forecast,
            model_version,
            batch.warm.tolist(),
            (batch.lower, batch.upper) if batch.lower.size else None,
        )
        topic = self.output_topic
        partitions = ticks.partition[rows].tolist()
        offsets = ticks.offset[rows].tolist()
        part_header = {p: str(p).encode() for p in set(partitions)}
        records: list[OutRecord] = [
            (topic, keys[j], values[j],
             [("source.partition", part_header[partitions[j]]),
              ("source.offset", b"%d" % offsets[j])])
            for j in range(len(index))
        ]  # fmt: skip
        self._batch.extend(records)
        self._dispatch(records)

    def send_state(self, records: Sequence[StateRecord]) -> None:
        """Queue changelog records ``(partition, stream key, snapshot or None, headers)``;
        None = tombstone.

        The partition is given explicitly: the state of input partition p lives in changelog
        partition p whatever partitioner the input's producers used. A negative partition is a
        bug upstream; it is refused with a log line rather than taking the daemon down.
        """
        topic = self.changelog_topic
        if topic is None or not records:
            return
        bad = [r for r in records if r[0] < 0]
        if bad:
            log.error("event=state_record_without_partition count=%d action=skip", len(bad))
            records = [r for r in records if r[0] >= 0]
        self._batch_state.extend(records)
        if self._broken is not None:
            return
        try:
            self.producer.send_state(topic, records)
        except ClientError as exc:
            self._broken = str(exc)

    def send_dead_letters(self, rejections: Sequence[Rejection]) -> None:
        """Queue each rejection with its original key and value bytes and reason headers."""
        records = [(self.dlq_topic, r.key, r.value, r.headers()) for r in rejections]
        self._batch.extend(records)
        self._dispatch(records)

    def close(self) -> None:
        self.producer.close(10.0)


class AtLeastOnceSink(Sink):
    """Sends asynchronously; :meth:`flush` waits for every acknowledgement and resends the
    micro-batch with a fresh producer until it goes through (module docstring)."""

    def _new_producer(self) -> ProducerClient:
        return clients.producer(self.kafka, None)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Block until every queued record is acknowledged, resending the batch on failure.

        Raises BrokerError only if the daemon is stopping before the batch got through.
        """
        backoff = Backoff(self.stop, first_s=1.0, max_s=MAX_BACKOFF_S)
        while True:
            failed = self._wait(timeout_s)
            if failed is None:
                self._batch, self._batch_state = [], []
                return
            delay = backoff.fail()
            metrics.SEND_RETRIES.inc()
            log.warning(
                "event=send_failed records=%d attempt=%d retry_in_s=%.1f error=%r",
                len(self._batch), backoff.failures, delay, failed,
            )  # fmt: skip
            if backoff.wait(delay):
                raise BrokerError(f"stopping with {len(self._batch)} unsent records ({failed})")
            self._rebuild()

    def _wait(self, timeout_s: float) -> str | None:
        if self._broken is not None:
            broken, self._broken = self._broken, None
            self.producer.forget()
            return broken
        return self.producer.flush(timeout_s)

    def _rebuild(self) -> None:
        """A fresh producer (the old one may be wedged after a broker restart), then resend."""
        try:
            self.producer.close(0.0)
        except Exception:  # closing a broken producer can fail in many ways; it is discarded
            log.debug("event=producer_close_failed", exc_info=True)
        try:
            self.producer = self._new_producer()
        except BrokerError as exc:
            log.warning("event=producer_rebuild_failed error=%s", exc)
            return  # the next flush attempt fails fast and backs off again
        self._dispatch(self._batch)
        state, self._batch_state = self._batch_state, []
        self.send_state(state)


class _Call:
    """A call run once (on the call thread or inline) that keeps what it raised in
    :attr:`error` for its owner to re-raise in its own thread; :attr:`done` is set after."""

    def __init__(self, call: Callable[[], object]) -> None:
        self.call = call
        self.error: BaseException | None = None
        self.done = threading.Event()

    def __call__(self) -> None:
        try:
            self.call()
        except BaseException as exc:  # re-raised by ExactlyOnceSink._settle
            self.error = exc
        finally:
            self.done.set()


class _CallThread:
    """One long-lived daemon thread that runs the calls handed to it: a call bounded by a
    watchdog costs a queue round trip instead of a thread start (~10 commits a second), and a
    commit can run while the main thread polls the next records. A call that overruns its
    limit keeps the thread busy; its owner drops it (:meth:`ExactlyOnceSink._returned`) and makes
    a new one for the next call."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="txn-call", daemon=True).start()

    def _loop(self) -> None:
        while (call := self._calls.get()) is not None:
            call()  # never raises: _Call keeps the exception

    def submit(self, call: _Call) -> None:
        """Queue ``call``; its ``done`` event says when it has run."""
        self._calls.put(call)

    def stop(self) -> None:
        """Let the thread end once it is idle (a hung call keeps it until that returns)."""
        self._calls.put(None)


class ExactlyOnceSink(Sink):
    """Each micro-batch is a transaction: :meth:`begin`, the sends, :meth:`commit` with the
    consumer offsets; any failure aborts and raises TransactionFailed (module docstring)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        stop: threading.Event | None = None,
        *,
        transactional_id: str,
        changelog_topic: str | None = None,
    ) -> None:
        self.transactional_id = transactional_id
        self._needs_rebuild = False  # a failed transaction left no usable producer
        self._calls: _CallThread | None = None  # runs the watchdog-bounded calls
        # The commit in flight: its call, deadline (monotonic s), limit (s) and commit time.
        self._commit: tuple[_Call, float, float, list[float]] | None = None
        super().__init__(kafka, stop, changelog_topic=changelog_topic)
        try:
            self._init_transactions()
        except Exception:
            self.producer.close(0.0)  # no half-made sink keeps a producer thread
            raise

    def _new_producer(self) -> ProducerClient:
        return clients.producer(self.kafka, self.transactional_id)

    def close(self) -> None:
        self._drop_calls()
        super().close()

    def _init_transactions(self) -> None:
        try:
            self.producer.init_transactions()
        except ClientError as exc:
            if exc.fenced:
                raise FencedError(f"transactional id {self.transactional_id!r} is fenced") from exc
            if exc.unsupported:
                raise TransactionsUnsupported(f"the broker refuses transactions: {exc}") from exc
            raise BrokerError(f"cannot initialise transactions: {exc}") from exc

    def begin(self) -> None:
        """Open the micro-batch's transaction.

        Raises BrokerError if the producer, lost in an earlier failure, cannot be rebuilt yet.
        """
        if self._needs_rebuild:
            self._abandon()
            self._needs_rebuild = False
        self._guard(self.producer.begin_transaction)

    def commit(self, offsets: dict[str, dict[int, int]], group_metadata: object) -> None:
        """Add ``{topic: {partition: next offset}}`` to the transaction and commit it."""
        self.start_commit(offsets, group_metadata)
        self.finish_commit()

    def start_commit(self, offsets: dict[str, dict[int, int]], group_metadata: object) -> None:
        """Start committing the transaction with ``offsets`` on the call thread and return at
        once; :meth:`finish_commit` joins it. Nothing may be sent in between (the producer
        belongs to the commit until it is joined). Raises TransactionFailed at once if a send
        of the transaction already failed."""
        assert self._commit is None, "a commit is already in flight"
        if self._broken is not None:
            self._fail(self._broken)
        # Both calls can hang for minutes after a broker restart (Tansu): a watchdog bounds
        # them, each to the transaction timeout.
        limit = self.kafka.transaction_timeout_ms / 1000
        producer = self.producer
        finished: list[float] = []

        def both() -> None:
            producer.send_offsets_to_transaction(offsets, group_metadata)
            producer.commit_transaction()
            finished.append(time.time())

        self._commit = (self._launch(both), time.monotonic() + 2 * limit, 2 * limit, finished)

    @property
    def committing(self) -> bool:
        """Whether a commit started by :meth:`start_commit` has not been joined yet."""
        return self._commit is not None

    def finish_commit(self, block: bool = True) -> float | None:
        """Join the commit in flight: the wall-clock time (s) at which it committed, or None if
        ``block`` is False and it is still running. Raises TransactionFailed (or FencedError)
        if it failed or overran its limit, exactly as a synchronous commit would."""
        assert self._commit is not None, "no commit in flight"
        call, deadline, limit, finished = self._commit
        if not block and not call.done.is_set() and time.monotonic() < deadline:
            return None
        self._commit = None
        self._settle(call, max(deadline - time.monotonic(), 0.0), limit)
        self.producer.forget()
        self._batch, self._batch_state = [], []
        return finished[0]

    def _guard(self, call: Callable[[], object], timeout_s: float | None = None) -> None:
        """Run a transactional call; fencing stops the daemon, anything else fails the batch."""
        if timeout_s is None:
            started = _Call(call)
            started()
        else:
            started = self._launch(call)
        self._settle(started, timeout_s, timeout_s)

    def _launch(self, call: Callable[[], object]) -> _Call:
        """Start ``call`` on the call thread (a hung call is left behind on its thread with the
        discarded producer)."""
        if self._calls is None:
            self._calls = _CallThread()
        started = _Call(call)
        self._calls.submit(started)
        return started

    def _settle(self, call: _Call, wait_s: float | None, limit_s: float | None) -> None:
        """Wait up to ``wait_s`` for ``call`` (None: it ran inline), then raise what it raised
        the way :meth:`_fail` says."""
        if wait_s is not None and not self._returned(call, wait_s):
            self._fail(f"transactional call hung for {limit_s or 0:.0f}s", abort=False)
        exc = call.error
        if exc is None:
            return
        if isinstance(exc, ClientError):
            self._fail(str(exc), cause=exc)
        raise exc

    def _returned(self, call: _Call, wait_s: float) -> bool:
        """Whether ``call`` returned within ``wait_s``. If not, the call thread it overran is
        given up: it ends once that call returns, if ever; the next call gets a new one."""
        if call.done.wait(wait_s):
            return True
        self._drop_calls()
        return False

    def _drop_calls(self) -> None:
        if self._calls is not None:
            self._calls.stop()
            self._calls = None

    def _fail(self, why: str, abort: bool = True, cause: ClientError | None = None) -> None:
        """Abort (unless the producer hangs), then start over with a fresh producer:
        kafka-python keeps a producer whose transactional request failed in an error state that
        an abort does not always clear. Raises TransactionFailed, or FencedError when another
        instance took our transactional id: a new producer would fence it in turn, and two
        instances would take the id from each other for ever, so this one must stop."""
        # Asked before the reset: kafka-python reports fencing on a pending send's future.
        fenced = abort and ((cause is not None and cause.fenced) or self.producer.fenced())
        self._batch, self._batch_state, self._broken = [], [], None
        self.producer.forget()
        if fenced:
            raise FencedError(
                f"transactional id {self.transactional_id!r} was fenced: another instance with "
                "the same kafka.instance_id took over; this one stops (give every replica its "
                "own kafka.instance_id)"
            ) from cause
        if abort:
            self._abort_bounded()
        try:
            self._abandon()
        except BrokerError as exc:
            log.warning("event=producer_rebuild_failed error=%s", exc)
            self._needs_rebuild = True
        raise TransactionFailed(f"transaction aborted: {why}")

    def _abort_bounded(self) -> None:
        """Abort the open transaction within the transaction timeout. kafka-python's abort
        waits without a limit, and after a broker restart the coordinator may never answer it
        (the loop stopped there for good). Giving up loses nothing: the fresh producer that
        :meth:`_abandon` starts with the same transactional id fences this one, and the broker
        aborts what it left open."""
        limit = self.kafka.transaction_timeout_ms / 1000
        abort = self._launch(self.producer.abort_transaction)
        if not self._returned(abort, limit):
            log.warning("event=abort_hung seconds=%.0f action=new_producer", limit)
        elif isinstance(abort.error, ClientError):
            log.debug("event=abort_failed error=%s", abort.error)
        elif abort.error is not None:
            raise abort.error

    def _abandon(self) -> None:
        """Drop a wedged transactional producer and start a fresh one with the same id."""
        try:
            self.producer.close(0.0)
        except Exception:  # a wedged producer can fail to close in many ways; it is discarded
            log.debug("event=producer_close_failed", exc_info=True)
        self.producer = self._new_producer()
        self._init_transactions()
