"""The stall check of a replica's engine (rayllm_app.replica.stall_watch)."""

from __future__ import annotations

from rayllm_app.replica.stall_watch import EngineProgress


def test_an_idle_engine_is_never_stalled_and_a_new_request_starts_the_clock():
    progress = EngineProgress(3.0)
    progress.last_step -= 100  # idle for a long time
    assert progress.stalled(0) is None
    progress.submitted()
    assert progress.stalled(1) is None  # it just arrived
    assert progress.stalled(1, now=progress.waiting_since + 3.5) is not None


def test_steps_keep_it_healthy_and_a_stall_is_for_good():
    progress = EngineProgress(3.0)
    progress.submitted()
    progress.step()
    start = progress.last_step
    assert progress.stalled(4, now=start + 2) is None
    assert progress.stalled(4, now=start + 4) is not None
    # Its requests were failed and aborted: empty, but still stalled, and still after it steps
    # again: the replica is replaced, never trusted with new requests.
    assert progress.stalled(0, now=start + 5) is not None
    progress.step()
    assert progress.stalled(0) is not None and progress.stalled(3) is not None
