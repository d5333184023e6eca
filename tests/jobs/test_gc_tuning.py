import gc
import threading

from nlpstream.jobs.gc_tuning import YOUNG_THRESHOLD, tuned_gc


def test_settings_apply_within_the_block_and_are_restored_after_the_last_user():
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    with tuned_gc():
        assert gc.get_threshold() == (YOUNG_THRESHOLD, *before[1:])
        assert gc.get_freeze_count() > 0
        with tuned_gc():  # a second job in the same process shares the settings
            assert gc.get_threshold()[0] == YOUNG_THRESHOLD
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD and gc.get_freeze_count() > 0
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_disabled_changes_nothing_and_an_exception_still_restores():
    before = gc.get_threshold()
    with tuned_gc(enabled=False):
        assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    try:
        with tuned_gc():
            raise RuntimeError("job failed")
    except RuntimeError:
        pass
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_concurrent_users_restore_once_both_are_done():
    before = gc.get_threshold()
    inside, release = threading.Event(), threading.Event()

    def other_job():
        with tuned_gc():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other_job)
    t.start()
    assert inside.wait(10)
    with tuned_gc():
        pass
    assert gc.get_threshold()[0] == YOUNG_THRESHOLD  # the other job still runs
    release.set()
    t.join(10)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
