"""Start-up's objects stay out of the garbage collector's reach while any worker of the process runs."""

from __future__ import annotations

import gc

from worker.loop.service import _StartupObjectsFrozen


def test_the_first_worker_to_start_freezes_and_the_last_to_stop_unfreezes():
    assert gc.get_freeze_count() == 0
    with _StartupObjectsFrozen():
        frozen = gc.get_freeze_count()
        assert frozen > 0
        # Frozen objects that die leave the count, so it may shrink a little; an unfreeze empties it.
        with _StartupObjectsFrozen():  # a second worker in the same process
            assert gc.get_freeze_count() > frozen // 2
        assert gc.get_freeze_count() > frozen // 2, "the other worker still runs"
    assert gc.get_freeze_count() == 0
