"""Pure logic that decides what a backfill rerun skips: finished ranges, and Ray batches cut back into pieces."""

from __future__ import annotations

import pyarrow as pa

from nlpstream.jobs.backfill_inputs import Piece
from nlpstream.jobs.backfill_output import covered, merge, next_undone


def test_finished_ranges_merge_and_answer_what_is_covered_and_where_to_resume():
    ranges = merge([(20, 29), (0, 9), (10, 19), (40, 49), (45, 47)])
    assert ranges == [(0, 29), (40, 49)]
    assert covered(ranges, 0, 29) and covered(ranges, 41, 49)
    assert not covered(ranges, 25, 40) and not covered(ranges, 30, 30)
    assert next_undone(ranges, 0) == 30 and next_undone(ranges, 35) == 35 and next_undone(ranges, 45) == 50
    assert next_undone([], 7) == 7


def test_a_ray_batch_is_cut_back_into_the_readers_pieces():
    from nlpstream.jobs.backfill_ray import _runs, _tagged

    def piece(topic: str, first: int, n: int) -> Piece:
        return Piece(topic, 0, first, f"/in/{topic}.jsonl", pa.table({"text": [f"t{first + i}" for i in range(n)]}))

    # Ray merged: a's piece 0..9 and 10..19, a's piece 30..34 (20..29 finished earlier), b's piece 0..3
    batch = pa.concat_tables([_tagged(piece("a", 0, 10)), _tagged(piece("a", 10, 10)), _tagged(piece("a", 30, 5)),
                              _tagged(piece("b", 0, 4))])
    runs = _runs(batch, piece_rows=10)
    assert [(p.topic, p.first, p.last, p.source) for p in runs] == [
        ("a", 0, 9, "/in/a.jsonl"), ("a", 10, 19, "/in/a.jsonl"), ("a", 30, 34, "/in/a.jsonl"), ("b", 0, 3, "/in/b.jsonl")]
    assert runs[1].table.column_names == ["text"] and runs[1].table.column("text").to_pylist()[0] == "t10"
