"""The offset ledger of the stream job: what is handled, durable and committed, per partition.

Pure bookkeeping, no Kafka and no I/O, so the rules that decide what may be
committed have fast unit tests of their own. Offsets are kept as *next
offsets* (one past the last record), one number per partition for each
stage, never one entry per record:

- *position*: the next offset the job accepts; records below it are already
  in the output (file resume) or were handled in this session, and are skipped;
- *handled*: records up to here are decoded and labeled or dead-lettered, in
  the sinks' buffers but not yet durable;
- *sealed*: handled records set aside for the flush under way (it may run
  beside the loop, which goes on handling newer records meanwhile);
- *durable*: their dead letters, files and alerts are flushed; not yet committed.

:meth:`OffsetLedger.to_commit` only ever offers durable offsets of partitions
the caller still owns; :meth:`OffsetLedger.committed` forgets them unless a
newer durable offset arrived meanwhile. Not thread-safe: the job calls it
under its lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

TP = tuple[str, int]


class OffsetLedger:
    """handled -> durable -> committed, per partition (see the module docstring)."""

    def __init__(self) -> None:
        self._position: dict[TP, int] = {}
        self._handled: dict[TP, int] = {}
        self._sealed: dict[TP, int] = {}
        self._durable: dict[TP, int] = {}

    # -- accepting records --------------------------------------------------------
    def position(self, tp: TP) -> int | None:
        """The next offset accepted on ``tp``; None when the partition has no floor yet."""
        return self._position.get(tp)

    def accept(self, tp: TP, offset: int) -> bool:
        """True when ``offset`` is new on ``tp`` (and move the position past it); False: skip it."""
        floor = self._position.get(tp)
        if floor is not None and offset < floor:
            return False
        self._position[tp] = offset + 1
        return True

    def accept_run(self, tp: TP, offsets: Sequence[int]) -> int:
        """For ascending ``offsets`` of one partition: how many leading ones to skip; the rest are accepted."""
        if not offsets:
            return 0
        floor = self._position.get(tp)
        skip = 0
        if floor is not None:
            while skip < len(offsets) and offsets[skip] < floor:
                skip += 1
        if skip < len(offsets):
            self._position[tp] = offsets[-1] + 1
        return skip

    # -- handled and durable ----------------------------------------------------------
    def handled(self, tp: TP, last_offset: int) -> None:
        """Every record of ``tp`` up to ``last_offset`` is handled (labeled or dead-lettered, not yet durable)."""
        if last_offset + 1 > self._handled.get(tp, 0):
            self._handled[tp] = last_offset + 1

    def settled(self, tp: TP) -> bool:
        """True when nothing of ``tp`` is handled-but-not-durable or durable-but-not-committed."""
        return tp not in self._handled and tp not in self._sealed and tp not in self._durable

    def has_pending(self) -> bool:
        """True while something handled (sealed or not) is not yet durable."""
        return bool(self._handled) or bool(self._sealed)

    def seal(self) -> None:
        """Everything handled so far goes to the next flush (with what an earlier, failed flush left sealed)."""
        for tp, off in self._handled.items():
            if off > self._sealed.get(tp, 0):
                self._sealed[tp] = off
        self._handled.clear()

    def made_durable(self) -> None:
        """Everything sealed is durable now (the sinks' flush of the sealed records returned)."""
        self._durable.update(self._sealed)
        self._sealed.clear()

    # -- committing -----------------------------------------------------------------------
    def to_commit(self, owned: Iterable[TP]) -> dict[TP, int]:
        """Durable next offsets not yet committed, for the partitions in ``owned`` only."""
        owned = set(owned)
        return {tp: off for tp, off in self._durable.items() if tp in owned}

    def committed(self, offsets: dict[TP, int]) -> None:
        """``offsets`` (from :meth:`to_commit`) are committed; keep any newer durable offset."""
        for tp, off in offsets.items():
            if self._durable.get(tp) == off:
                del self._durable[tp]

    # -- partitions coming and going -------------------------------------------------------
    def assigned(self, tp: TP, resume_at: int | None) -> None:
        """``tp`` is (re)assigned; ``resume_at`` is the next offset the finished files do not hold, if any."""
        self._handled.pop(tp, None)
        self._sealed.pop(tp, None)
        self._durable.pop(tp, None)
        if resume_at is None:
            self._position.pop(tp, None)
        else:
            self._position[tp] = resume_at

    def discard(self, tp: TP) -> None:
        """What was handled on ``tp`` but not made durable is dropped, sealed or not (it will be redelivered)."""
        self._handled.pop(tp, None)
        self._sealed.pop(tp, None)

    def forget(self, tps: Iterable[TP]) -> None:
        """``tps`` are no longer ours: drop every stage."""
        for tp in tps:
            self._position.pop(tp, None)
            self._handled.pop(tp, None)
            self._sealed.pop(tp, None)
            self._durable.pop(tp, None)
