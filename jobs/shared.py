"""What the parts of the stream job share: one small state object handed to each part.

The stream job (jobs/stream.py) is a coordinator over parts that each keep
the state only they use: the checkpoint (jobs/checkpoint.py), the rebalance
handling (jobs/rebalance.py), liveness (jobs/liveness.py), batching and
classification (jobs/batching.py) and the schema registry gate
(jobs/registry_gate.py). What several of them read or write lives here:
the lock, the offset ledger, the input, the sink, the batches in flight and
a few per-partition maps.

Threading: rebalance callbacks run while the main loop is inside ``poll``
(on the polling thread with kafka-python 2.x, on its IO thread with 3.x);
callbacks and the loop share this state under ``lock``, which is
re-entrant (a callback runs flushes that take it again).
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from nlpstream.consumers import DecodeError, InputRecord
from nlpstream.inference import Prediction
from nlpstream.jobs.config import StreamConfig
from nlpstream.jobs.ledger import OffsetLedger
from nlpstream.jobs.transactions import PartitionTransactions

TP = tuple[str, int]
MAX_BACKOFF_S = 30.0
LOGGER_NAME = "nlpstream.jobs.stream"  # every part logs as the stream job: users filter and grep on that name


@dataclass
class StreamSummary:
    """What one run of the stream job did."""

    consumed: int = 0
    labeled: int = 0
    dead_lettered: int = 0
    skipped: int = 0
    alerts: int = 0
    files: list[str] = field(default_factory=list)
    labels: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def throughput(self) -> float:
        return self.labeled / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Batch:
    """One micro-batch between decoding and being handled: its classification may still be running."""

    records: list[InputRecord]
    good: Any  # a jobs.handling.DecodedBatch: the records with usable text, as columns
    undecodable: list[tuple[InputRecord, DecodeError]]
    results: Future[list[Prediction | BaseException]]  # already done when classified on the loop's thread
    generations: dict[TP, int] = field(default_factory=dict)  # each partition's generation when it was accepted


@dataclass(eq=False)
class SharedState:
    """State several parts of the stream job read or write; guarded by ``lock`` unless noted."""

    config: StreamConfig
    lock: threading.RLock = field(default_factory=threading.RLock)
    ledger: OffsetLedger = field(default_factory=OffsetLedger)  # handled -> durable -> committed per partition
    summary: StreamSummary = field(default_factory=StreamSummary)
    in_flight: deque[Batch] = field(default_factory=deque)  # decoded, classification submitted, not yet handled
    sink: Any = None  # the row sink, built by the wiring (never replaced)
    input: Any = None  # the KafkaInput; replaced by a rebuild (main loop only)
    txn: PartitionTransactions | None = None  # kafka.transactions: one transaction per input partition
    fatal: BaseException | None = None  # raised in a rebalance callback (the client swallows those)
    paused: bool = False  # backpressure: fetching paused while rows wait for the sink
    registry_paused: bool = False  # a schema registry outage: fetching paused until the next try
    # committed offsets, for the committed-lag gauge and the resume commit (network reads: main loop only)
    committed: dict[TP, int] = field(default_factory=dict)  # the group's committed offset (or where we started)
    resume_commits: dict[TP, int] = field(default_factory=dict)  # where the files end, ahead of the group's commit
    pending: dict[TP, float] = field(default_factory=dict)  # assigned or rewound, paused: not fenced / offset unread
    # bumped whenever a partition is rewound or (re)assigned: a batch accepted under an older generation holds
    # records from before the rewind, and none of them may be handled after it (their rows would land beyond the
    # rows the rewind discarded, and the files' end would jump over those)
    generations: dict[TP, int] = field(default_factory=dict)

    def new_generation(self, tp: TP) -> None:
        self.generations[tp] = self.generations.get(tp, 0) + 1

    def stale(self, batch: "Batch", tp: TP) -> bool:
        """True when ``tp`` was rewound or reassigned since ``batch`` was accepted (or waits to be prepared)."""
        return tp in self.pending or batch.generations.get(tp, 0) != self.generations.get(tp, 0)

    def resumable(self) -> list[TP]:
        """The assigned partitions that may fetch: not those waiting to be prepared (transactions)."""
        return [tp for tp in self.input.assignment() if tp not in self.pending]
