"""Rebalance handling of the stream job: assignment, revocation, loss, and where each partition resumes.

- on assignment the job resumes after the last offset held by the finished
  files (file names carry offsets), skipping anything older, so a crash at
  any point yields no lost and no duplicate rows; the group's committed
  offsets of new partitions are read later on the main loop
  (:meth:`Rebalance.settle_assigned`) and, where the files are ahead, that
  position is committed by the checkpoint;
- with ``kafka.transactions`` a new partition waits, paused, until its
  transactional id is fenced and its committed offset read
  (:meth:`Rebalance.prepare`, see jobs/transactions.py);
- on revocation what is in hand is made durable (never committed: the next
  owner resumes from the files); on loss it is dropped. Each callback first
  waits for a flush running beside the loop (jobs/checkpoint.py).

Threading: the callbacks run while the main loop is inside ``poll`` (on
the polling thread with kafka-python 2.x, on its IO thread with 3.x) and
take the shared lock; they never commit. Network reads (committed offsets,
fencing) happen on the main loop only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from nlpstream.jobs import metrics
from nlpstream.jobs.checkpoint import Checkpoint
from nlpstream.jobs.liveness import Liveness
from nlpstream.jobs.shared import LOGGER_NAME, MAX_BACKOFF_S, TP, SharedState
from nlpstream.jobs.transactions import TransactionError, resume_point
from nlpstream.sinks import SinkError

log = logging.getLogger(LOGGER_NAME)


def read_files_end(sink: Any, topic: str, partition: int, heartbeat: Callable[[], None]) -> int | None:
    """Remove temporary files of the partition and read where its files end (retried with backoff).

    An object store may be briefly unreachable: tries for up to a minute, beating the watchdog
    between tries, then raises the SinkError (the job stops with one error line).
    """
    deadline = time.monotonic() + 60.0
    delay = 0.5
    while True:
        try:
            sink.remove_temp_files(topic, partition)
            return sink.last_offset(topic, partition)
        except SinkError as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("cannot read where %s-%d's files end, retrying in %.1fs: %s", topic, partition, delay, exc)
        heartbeat()
        time.sleep(delay)
        delay = min(MAX_BACKOFF_S, delay * 2)


class Rebalance:
    """Partitions coming and going, and the positions they resume at.

    ``drain`` handles every batch in flight (a failure is kept in the
    shared state's ``fatal``, since the client swallows callback errors).
    """

    def __init__(self, state: SharedState, checkpoint: Checkpoint, liveness: Liveness,
                 drain: Callable[[], None]) -> None:
        self._state = state
        self.config = state.config
        self._checkpoint = checkpoint
        self._liveness = liveness
        self._drain = drain
        self._resume_at: dict[TP, int | None] = {}  # assigned, committed offset not read yet: where the files end
        self._next_committed_read = 0.0
        self._settle_failing_since: float | None = None
        self._settle_warned = False
        # kafka.transactions: dead letters, Kafka alerts and offsets in one transaction per input partition
        self._next_prepare = 0.0
        self._prepare_backoff = 0.0
        self._rows_floor: dict[TP, int] = {}  # where the files end: records below are re-handled without rows
        self._rebuild_wanted = False  # fenced: another worker holds our partition; leave the group and rejoin

    def rows_floor(self, tp: TP) -> int | None:
        """Where ``tp``'s files end when its records are handled again (transactions): below, no row is written."""
        return self._rows_floor.get(tp)

    # -- rebalance callbacks (kafka-python IO thread, main loop inside poll) ---------
    def on_assigned(self, partitions: list[TP]) -> None:
        state = self._state
        with state.lock:
            self._checkpoint.wait()  # a flush beside the loop ends before the sink is listed
            self._drain()
            for topic, partition in partitions:
                tp = (topic, partition)
                try:
                    last = self.files_end(topic, partition)
                except SinkError as exc:  # the client swallows callback errors: the loop raises it after poll
                    state.fatal = exc
                    return
                if state.txn is not None:
                    self._assigned_transactional(tp)  # where the files end is read again once its id is fenced
                    continue
                state.ledger.assigned(tp, None if last is None else last + 1)
                self._resume_at[tp] = None if last is None else last + 1
                state.committed.pop(tp, None)
                self._next_committed_read = 0.0
                if last is not None:
                    state.input.seek(topic, partition, last + 1)
                self._liveness.assigned(tp)
                if state.registry_paused:  # a registry outage: new partitions wait for the next try too
                    state.input.pause([tp])
                log.info("assigned %s-%d, files end at %s", topic, partition, last)

    def files_end(self, topic: str, partition: int) -> int | None:
        """Where the partition's files end (see :func:`read_files_end`), feeding the watchdog between tries."""
        return read_files_end(self._state.sink, topic, partition, self._liveness.heartbeat)

    def on_revoked(self, partitions: list[TP]) -> None:
        state = self._state
        with state.lock:
            self._checkpoint.wait()  # a flush beside the loop ends first (the flush below waits for it too)
            self._drain()  # what was polled before the rebalance is handled and flushed with the rest
            if self._checkpoint.has_pending() and not self._checkpoint.flush():
                for topic, partition in partitions:
                    self._checkpoint.discard(topic, partition)
            self.forget(partitions)

    def on_lost(self, partitions: list[TP]) -> None:
        with self._state.lock:
            self._checkpoint.wait()  # what a flush in flight makes durable stays so; the rest is dropped
            self._drain()
            for topic, partition in partitions:
                self._checkpoint.discard(topic, partition)
            self.forget(partitions)

    def forget(self, partitions: list[TP]) -> None:
        state = self._state
        if state.txn is not None:
            state.txn.retire(partitions)  # their open transactions are aborted: the next owner redoes them
        for topic, partition in partitions:
            tp = (topic, partition)
            state.ledger.forget([tp])
            self._liveness.forget(tp)
            self._resume_at.pop(tp, None)
            state.resume_commits.pop(tp, None)
            state.committed.pop(tp, None)
            state.pending.pop(tp, None)
            self._rows_floor.pop(tp, None)
            for gauge in (metrics.CONSUMER_LAG, metrics.COMMITTED_LAG):
                try:
                    gauge.remove(topic, str(partition))
                except KeyError:
                    pass

    # -- resume positions (main loop) ---------------------------------------------------
    def settle_due(self, now: float) -> bool:
        """True when newly assigned partitions wait for their committed offsets to be read (now due)."""
        return bool(self._resume_at) and now >= self._next_committed_read

    def unsettled(self) -> bool:
        """True while a newly assigned partition's committed offset is not read yet."""
        return bool(self._resume_at)

    def settle_assigned(self, now: float) -> None:
        """Read the group's committed offsets of newly assigned partitions; where the files are ahead, have
        the checkpoint's commit commit where they end.

        After a resume from files (a reset group, a new group over the same
        output) the job seeks past what the files hold; committing that
        position at once keeps the group's committed lag true even when no new
        record arrives. Before a partition's first commit, committed lag is
        measured from where consumption starts (the log start offset with
        ``auto_offset_reset=earliest``, else the end offset now). Failed reads
        are retried a few seconds later, failed commits by the checkpoint's commit.
        """
        state = self._state
        with state.lock:
            waiting = dict(self._resume_at)
        try:
            found = state.input.committed_offsets(waiting)
            no_commit = [tp for tp in waiting if found.get(tp) is None and waiting[tp] is None]
            starts: dict[TP, int] = {}
            if no_commit:
                reset = state.input.beginning_offsets if self.config.kafka.auto_offset_reset == "earliest" \
                    else state.input.end_offsets
                starts = reset(no_commit)
            resumed = [tp for tp, resume in waiting.items() if resume is not None]
            ends = state.input.end_offsets(resumed) if resumed else {}
        except Exception as exc:  # noqa: BLE001 - broker trouble: the poll path reports it; read again later
            if self._settle_failing_since is None:
                self._settle_failing_since = now
            elif now - self._settle_failing_since >= 60.0 and not self._settle_warned:
                self._settle_warned = True
                log.warning("the group's committed offsets could not be read for %.0fs (committed lag unknown, "
                            "resume positions not committed yet); still trying: %s", now - self._settle_failing_since,
                            exc)
            log.debug("committed offsets unavailable: %s", exc)
            self._next_committed_read = now + 5.0
            return
        self._settle_failing_since, self._settle_warned = None, False
        with state.lock:
            owned = set(state.input.assignment())
            for tp, resume in waiting.items():
                if tp not in owned or self._resume_at.get(tp, -1) != resume:
                    continue  # revoked or reassigned meanwhile: the next assignment reads again
                del self._resume_at[tp]
                group = found.get(tp)
                known = max(-1 if group is None else group, state.committed.get(tp, -1))
                if resume is not None and resume > ends.get(tp, resume):
                    log.warning("the files of %s-%d end at offset %d but the partition ends at %d (was the topic "
                                "recreated?); not committing past its end", tp[0], tp[1], resume - 1, ends[tp])
                    resume = None
                if resume is not None and resume > known:
                    state.resume_commits[tp] = resume  # sent by the checkpoint's commit, retried there until it lands
                elif known >= 0:
                    state.committed[tp] = known
                elif tp in starts:
                    state.committed[tp] = starts[tp]

    # -- kafka.transactions (see jobs/transactions.py) ---------------------------------------
    def txn_failed(self, error: TransactionError) -> None:
        """A partition's transaction is lost or its outcome unknown: handle the partition again from the
        group's committed offset, with a new producer (whose fence ends that transaction). Caller holds the lock.

        Fenced means another worker holds the partition now (we were evicted):
        leave the group and join again rather than fence it back.
        """
        state = self._state
        assert state.txn is not None
        tp = error.tp
        state.txn.retire([tp])
        if error.fenced:
            log.warning("transactions of %s-%d fenced by another worker (this one was evicted?); dropping what "
                        "is in hand and rejoining the group: %s", tp[0], tp[1], error)
            self._rebuild_wanted = True
        else:
            log.warning("transaction of %s-%d failed; handling it again from the committed offset: %s",
                        tp[0], tp[1], error)
        if tp in set(state.input.assignment()):
            self._checkpoint.discard(*tp)
            state.new_generation(tp)  # a batch of it still being classified is not handled after the rewind
            state.ledger.assigned(tp, None)
            state.committed.pop(tp, None)
            state.resume_commits.pop(tp, None)
            state.pending[tp] = time.monotonic()
            state.input.pause([tp])

    def _assigned_transactional(self, tp: TP) -> None:
        """A newly assigned partition waits, paused, until :meth:`prepare` fenced its id. Caller holds the lock."""
        state = self._state
        state.new_generation(tp)
        state.ledger.assigned(tp, None)  # nothing is accepted before the prepare (see Batches.accept)
        state.committed.pop(tp, None)
        state.pending[tp] = time.monotonic()
        self._next_prepare = 0.0
        self._prepare_backoff = 0.0
        state.input.pause([tp])
        self._liveness.assigned(tp)

    def take_rebuild_wanted(self) -> bool:
        """True once after a fence: the caller makes what is in hand durable, leaves the group and rejoins."""
        wanted, self._rebuild_wanted = self._rebuild_wanted, False
        return wanted

    def txn_housekeeping(self, now: float) -> None:
        """Main loop: prepare waiting partitions, close retired producers (a rejoin after a fence: take_rebuild_wanted)."""
        state = self._state
        assert state.txn is not None
        if state.pending and now >= self._next_prepare:
            for tp in list(state.pending):
                if not self.prepare(tp):
                    self._prepare_backoff = min(MAX_BACKOFF_S, max(0.5, self._prepare_backoff * 2))
                    self._next_prepare = now + self._prepare_backoff
                    break
            else:
                self._prepare_backoff = 0.0
        state.txn.reap()

    def prepare(self, tp: TP) -> bool:
        """Fence ``tp``'s transactional id, then read its committed offset and resume there.

        Records between the committed offset and the end of the files are
        handled again: their dead letters and alerts go in the new
        transaction (whatever an earlier one sent was aborted by the fence or
        is committed with that offset), their rows are not written again.
        Without a committed offset the job starts at the log start with
        ``auto_offset_reset=earliest`` (a first transaction may have been lost
        after its files were written: everything below the files' end is
        handled again, without rows), else where the files end (committing
        that position) or, with no files, at the end of the log.
        False when the brokers did not answer (retried with backoff).
        """
        state = self._state
        assert state.txn is not None
        try:
            state.txn.open(tp)
            group = state.input.committed_offsets([tp]).get(tp)
            reset: dict[TP, int] = {}
            if group is None:
                reset = (state.input.beginning_offsets([tp]) if self.config.kafka.auto_offset_reset == "earliest"
                         else state.input.end_offsets([tp]))
        except Exception as exc:  # noqa: BLE001 - broker trouble: the poll path reports it; try again later
            log.warning("cannot prepare %s-%d for transactions yet (retrying): %s", tp[0], tp[1], exc)
            state.txn.retire([tp])
            return False
        with state.lock:
            if tp not in state.pending or tp not in set(state.input.assignment()):
                state.txn.retire([tp])  # revoked meanwhile
                return True
            try:
                last = state.sink.last_offset(*tp)
            except SinkError as exc:  # an object store briefly unreachable: tried again with backoff
                log.warning("cannot read where %s-%d's files end yet (retrying): %s", tp[0], tp[1], exc)
                state.txn.retire([tp])
                return False
            files_end = None if last is None else last + 1
            earliest = self.config.kafka.auto_offset_reset == "earliest"
            start, commit_start = resume_point(group, files_end, reset.get(tp) if earliest else None, earliest)
            if commit_start and start is not None:
                state.resume_commits[tp] = start  # committed by a transaction of its own
            if files_end is not None:
                self._rows_floor[tp] = files_end
            else:
                self._rows_floor.pop(tp, None)
            state.ledger.assigned(tp, start)
            if start is not None:
                state.input.seek(tp[0], tp[1], start)
            known = group if group is not None else reset.get(tp)
            if known is not None:
                state.committed[tp] = known
            del state.pending[tp]
            if not (state.paused or state.registry_paused):
                state.input.resume([tp])
            self._liveness.mark_progress([tp])
        log.info("assigned %s-%d (transactional): committed offset %s, files end at %s, resuming at %s",
                 tp[0], tp[1], group, None if files_end is None else files_end - 1, start)
        return True
