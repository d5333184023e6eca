"""Liveness of the stream job: the loop's heartbeat and watchdog, the fetch-stall guard, the idle timeout.

- the main loop beats once per round; a watchdog thread exits the process
  with code 75 (every thread's stack in the log) when a round stalls past
  ``stall_timeout``; with ``hard_backstop`` faulthandler's GIL-free timer
  backs it up;
- the fetch-stall guard runs on a clock that only runs inside ``poll`` (a
  long batch is no stall) and tells the loop when the consumer must be
  rebuilt;
- the idle timeout counts from the last record or assignment, and not while
  a partition is known to hold more; before the job stops for it, the
  brokers' end offsets confirm that every assigned partition is read to its
  end (a client that has not fetched since a broker restart or a rebalance
  does not know its end offsets yet).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable

from nlpstream.jobs import metrics
from nlpstream.jobs.shared import LOGGER_NAME, TP, SharedState

log = logging.getLogger(LOGGER_NAME)
STALL_EXIT_CODE = 75  # EX_TEMPFAIL: restart me


class Liveness:
    """The heartbeat, the watchdog, the fetch-stall guard and the idle timer of one stream job."""

    def __init__(self, state: SharedState, hard_backstop: bool = False) -> None:
        self._state = state
        self.config = state.config
        self._done = threading.Event()  # run() returned: the watchdog stops
        self._hard_backstop = hard_backstop  # also arm faulthandler's GIL-free timer (the process is ours)
        self._armed_at = -1e9
        self._beat = 0.0  # set by heartbeat() before the watchdog starts
        self._flush_since: Callable[[], float | None] = lambda: None  # start of a flush beside the loop, if any
        # fetch-stall guard, on a clock that only runs inside poll (a long batch is no stall):
        self.poll_clock = 0.0  # seconds spent in poll so far
        self._progress: dict[TP, float] = {}  # poll clock when each partition was assigned or last gave a record
        self._next_fetch_check = 0.0
        self._assigned_at: dict[TP, float] = {}  # monotonic time of each partition's assignment (idle timeout)
        self._idle_since = -1e18  # monotonic time the idle timer last started again after a refused confirmation

    # -- heartbeat and watchdog ---------------------------------------------------------
    def heartbeat(self) -> None:
        """The main loop is alive: note it for the watchdog, re-arm the hard backstop now and then."""
        self._beat = time.monotonic()
        if self._hard_backstop and self._beat - self._armed_at >= 5.0:
            # A thread that deadlocks while holding the GIL also stops the Python watchdog;
            # faulthandler's timer runs without the GIL: it dumps every stack and exits with 1.
            faulthandler.dump_traceback_later(self.config.stall_timeout + 30.0, exit=True)
            self._armed_at = self._beat

    def watch_flush(self, flushing_since: Callable[[], float | None]) -> None:
        """The watchdog also judges a flush beside the loop: ``flushing_since`` says when the one in flight
        started (None: none); one that runs past ``stall_timeout`` is a stall too, though the loop beats."""
        self._flush_since = flushing_since

    def start_watchdog(self) -> None:
        threading.Thread(target=self._watchdog, name="nlpstream-watchdog", daemon=True).start()

    def finished(self) -> None:
        """run() returns: the watchdog stops, the hard backstop is disarmed."""
        self._done.set()
        if self._hard_backstop:
            faulthandler.cancel_dump_traceback_later()

    def _watchdog(self) -> None:
        """Exit with code 75 (and every thread's stack in the log) when a loop round or a flush stalls."""
        limit = self.config.stall_timeout
        while not self._done.wait(min(5.0, limit / 4)):
            now = time.monotonic()
            flush_since = self._flush_since()
            if now - self._beat > limit:
                what = f"main loop stalled for {now - self._beat:.0f}s"
            elif flush_since is not None and now - flush_since > limit:
                what = f"a flush beside the main loop has run for {now - flush_since:.0f}s"
            else:
                continue
            log.error("%s (limit %.0fs); dumping stacks and exiting with 75", what, limit)
            faulthandler.dump_traceback(all_threads=True)
            sys.stderr.flush()
            os._exit(STALL_EXIT_CODE)

    # -- progress per partition -----------------------------------------------------------
    def polled(self, seconds: float) -> None:
        """The loop spent ``seconds`` inside poll: the fetch-stall clock moves on."""
        self.poll_clock += seconds

    def mark_progress(self, partitions: Iterable[TP]) -> None:
        """``partitions`` gave records (or were resumed: paused time is no fetch stall)."""
        for tp in partitions:
            self._progress[tp] = self.poll_clock

    def assigned(self, tp: TP) -> None:
        """``tp`` was assigned now: its stall period and the idle timer start again."""
        self._progress[tp] = self.poll_clock
        self._assigned_at[tp] = time.monotonic()

    def forget(self, tp: TP) -> None:
        self._progress.pop(tp, None)
        self._assigned_at.pop(tp, None)

    # -- idle timeout -------------------------------------------------------------------------
    def idle_for(self, now: float, last_input: float) -> float:
        """Seconds without input since the last record or assignment (or since :meth:`idle_confirmed` last said
        no); 0 while a partition is known to hold more.

        (The client learns a partition's end offset only from fetch responses,
        which an incremental fetch session skips for partitions with nothing
        new, so an unknown end offset or position does not hold the timer
        back: :meth:`idle_confirmed` asks the brokers before the job stops.)
        """
        state = self._state
        assigned = state.input.assignment()
        if not assigned or state.in_flight:
            return 0.0
        for topic, partition in assigned:
            high = state.input.highwater(topic, partition)
            if high is None:
                continue
            pos = state.input.position(topic, partition)
            if pos is None or pos < high:
                return 0.0
        assigned_at = max(self._assigned_at.get(tp, 0.0) for tp in assigned)
        return now - max(last_input, assigned_at, self._idle_since)

    def idle_confirmed(self, now: float, idle_s: float) -> bool:
        """The idle timer ran out (``idle_s`` seconds): True when the brokers' end offsets show every assigned
        partition read to its end; otherwise (a partition holds more, or the end or committed offsets cannot be
        read) the timer starts again at ``now`` and the job goes on.

        The timer trusts the client's own end offsets, which it learns only
        from fetch responses: a consumer that has not fetched since a broker
        restart or a new assignment knows positions but no end offsets, and
        without this check would stop with records still unread. A partition
        whose position is not known yet (its start not resolved: no record
        since its assignment) counts from the group's committed offset, where
        it starts.
        """
        state = self._state
        assigned = state.input.assignment()
        positions = {tp: state.input.position(*tp) for tp in assigned}
        unknown = [tp for tp, pos in positions.items() if pos is None]
        try:
            ends = state.input.end_offsets(assigned, timeout_s=5.0)
            if unknown:
                positions.update(state.input.committed_offsets(unknown, timeout_s=5.0))
        except Exception as exc:  # noqa: BLE001 - broker trouble: the poll path reports and retries it
            log.info("no input for %.0fs, but the brokers' offsets cannot be read (%s); going on", idle_s, exc)
            self._idle_since = now
            return False
        behind = {}
        for tp in assigned:
            pos, end = positions.get(tp), ends.get(tp)
            if pos is None or end is None or pos < end:
                behind[tp] = (pos, end)
        if not behind:
            return True
        log.info("no input for %.0fs, but partitions hold more (position, end offset): %s; going on", idle_s,
                 ", ".join(f"{t}-{p} {v}" for (t, p), v in sorted(behind.items())))
        self._idle_since = now
        return False

    # -- fetch-stall guard ----------------------------------------------------------------------
    def fetch_stalled(self, now: float) -> bool:
        """Every few seconds (monotonic ``now``): True when the consumer must be rebuilt (a fetch stall)."""
        if now < self._next_fetch_check:
            return False
        self._next_fetch_check = now + min(5.0, self.config.kafka.fetch_stall_timeout / 4)
        return self._check_fetch_progress()

    def _check_fetch_progress(self) -> bool:
        """True when an assigned partition has records it does not fetch: the caller rebuilds the consumer.

        A partition counts as stalled when it gave no record during
        ``kafka.fetch_stall_timeout`` seconds spent polling (time spent
        classifying or flushing does not count) since its assignment while the
        broker's end offset is past the consumer's position. This guards
        against client-side fetch stalls (kafka-python sends no new fetch to a
        broker while one is unanswered, and gives up on it only after
        request_timeout_ms, 305 s by default): what is durable is committed,
        the consumer leaves the group and a fresh one joins; the files resume
        logic makes the replay exact.
        """
        state = self._state
        limit, now = self.config.kafka.fetch_stall_timeout, self.poll_clock
        if state.paused or state.registry_paused:
            return False
        quiet = [tp for tp in state.input.assignment()
                 if tp not in state.pending and now - self._progress.setdefault(tp, now) >= limit]
        if not quiet:
            return False
        try:
            ends = state.input.end_offsets(quiet)
        except Exception as exc:  # noqa: BLE001 - broker trouble: the poll path reports and retries it
            log.debug("end offsets unavailable: %s", exc)
            for tp in quiet:  # an unreachable broker is no client stall: start the period again
                self._progress[tp] = now
            return False
        stalled = {}
        for tp in quiet:
            pos = state.input.position(*tp)
            if (pos is None and ends.get(tp, 0) > 0) or (pos is not None and ends.get(tp, pos) > pos):
                stalled[tp] = (pos, ends.get(tp))
            else:
                self._progress[tp] = now  # caught up: look again after another full period
        if not stalled:
            return False
        metrics.FETCH_STALLS.inc()
        log.warning("no record for %.0fs from partitions that hold more (position, end offset): %s; client state: %s;"
                    " rebuilding the consumer", limit,
                    ", ".join(f"{t}-{p} {v}" for (t, p), v in sorted(stalled.items())), self._state.input.fetch_state())
        return True
