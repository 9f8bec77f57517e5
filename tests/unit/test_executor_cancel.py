"""cancel_until_done: ending tasks whose first cancellation is lost (as pyreqwest 0.15 can lose
one when a request completes at that instant; see executor/transport.py)."""

from __future__ import annotations

import asyncio

from batchgate_server.providers.executor.transport import cancel_until_done


async def _swallows_first_cancel(started: asyncio.Event) -> None:
    """Like a request whose clean-up waits for a wake-up that never comes: the first cancel
    ends up waiting on a future nobody resolves."""
    started.set()
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        await asyncio.get_running_loop().create_future()


async def test_a_task_that_loses_its_first_cancel_is_ended():
    started = asyncio.Event()
    stuck = asyncio.ensure_future(_swallows_first_cancel(started))
    plain = asyncio.ensure_future(asyncio.sleep(60))
    await started.wait()
    await asyncio.wait_for(cancel_until_done([stuck, plain]), 5)
    assert stuck.cancelled() and plain.cancelled()


async def test_one_cancel_alone_leaves_it_running():
    """The failure cancel_until_done exists for: a cancel and a wait do not end such a task."""
    started = asyncio.Event()
    stuck = asyncio.ensure_future(_swallows_first_cancel(started))
    await started.wait()
    stuck.cancel()
    _, pending = await asyncio.wait([stuck], timeout=0.2)
    assert pending == {stuck}
    await cancel_until_done([stuck])


async def test_finished_tasks_and_their_errors_are_dropped():
    async def fails() -> None:
        raise RuntimeError("boom")

    done = asyncio.ensure_future(asyncio.sleep(0))
    failed = asyncio.ensure_future(fails())
    await asyncio.sleep(0.01)
    await cancel_until_done([done, failed])
    assert done.done() and failed.done()
