"""The engine's work channel (conveyor._workchannel.WorkChannel): trio's memory channel's
promises for one sender side and one receiver side, each checked against a case that
could break it: order, the bound, a handoff with no buffer, close (what waits and what is
left), and cancelled waits that take or give nothing."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from conveyor._workchannel import WorkChannel


async def test_jobs_come_out_in_order_and_the_buffer_is_bounded() -> None:
    channel = WorkChannel(3)
    for job in "abc":
        channel.send_nowait(job)
    assert len(channel) == 3
    with pytest.raises(trio.WouldBlock):
        channel.send_nowait("d")
    assert [channel.receive_nowait() for _ in range(3)] == ["a", "b", "c"]
    with pytest.raises(trio.WouldBlock):
        channel.receive_nowait()


async def test_a_waiting_receiver_gets_the_job_directly_first_come_first_served(
    autojump_clock: trio.testing.MockClock,
) -> None:
    channel = WorkChannel(0)
    got: list[tuple[str, object]] = []

    async def receiver(name: str) -> None:
        got.append((name, await channel.receive()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver, "first")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(receiver, "second")
        await trio.testing.wait_all_tasks_blocked()
        channel.send_nowait(1)  # no buffer: straight to the first receiver
        channel.send_nowait(2)
        with pytest.raises(trio.WouldBlock):
            channel.send_nowait(3)  # nobody waits, no room
    assert sorted(got) == [("first", 1), ("second", 2)]  # (they run in either order)
    assert len(channel) == 0


async def test_a_waiting_sender_gets_in_as_soon_as_there_is_room(
    autojump_clock: trio.testing.MockClock,
) -> None:
    for size in (0, 1):
        channel = WorkChannel(size)
        sent: list[int] = []

        async def sender(
            job: int, channel: WorkChannel = channel, sent: list[int] = sent
        ) -> None:
            await channel.send(job)
            sent.append(job)

        async with trio.open_nursery() as nursery:
            for job in range(3):
                nursery.start_soon(sender, job)
                await trio.testing.wait_all_tasks_blocked()
            assert sent == ([0] if size else [])
            got = [channel.receive_nowait() for _ in range(3 - size)]
            await trio.testing.wait_all_tasks_blocked()
            got += [channel.receive_nowait() for _ in range(size)]
        assert got == [0, 1, 2]
        assert sorted(sent) == [0, 1, 2]


async def test_close_ends_waiting_receivers_refuses_senders_and_keeps_the_buffer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    channel = WorkChannel(1)
    channel.send_nowait("kept")
    ended: list[str] = []

    async def blocked_sender() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await channel.send("refused")
        ended.append("sender")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocked_sender)
        await trio.testing.wait_all_tasks_blocked()
        channel.close()
        channel.close()  # idempotent
    assert ended == ["sender"]
    assert channel.receive_nowait() == "kept"  # buffered before the close
    with pytest.raises(trio.EndOfChannel):
        channel.receive_nowait()
    with pytest.raises(trio.ClosedResourceError):
        channel.send_nowait("late")

    empty = WorkChannel(1)

    async def blocked_receiver() -> None:
        with pytest.raises(trio.EndOfChannel):
            await empty.receive()
        ended.append("receiver")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocked_receiver)
        await trio.testing.wait_all_tasks_blocked()
        empty.close()
    assert ended == ["sender", "receiver"]


async def test_cancelled_waits_leave_the_channel_as_it_was(
    autojump_clock: trio.testing.MockClock,
) -> None:
    channel = WorkChannel(0)
    with trio.move_on_after(1) as scope:
        await channel.receive()
    assert scope.cancelled_caught
    with pytest.raises(trio.WouldBlock):
        channel.send_nowait("nobody waits any more")  # the cancelled receiver is gone
    with trio.move_on_after(1) as scope:
        await channel.send("given up")
    assert scope.cancelled_caught
    with pytest.raises(trio.WouldBlock):
        channel.receive_nowait()  # the cancelled sender's job is not in the channel
    # A wait already cancelled is a checkpoint that takes or gives nothing, even when it
    # could have.
    channel = WorkChannel(1)
    channel.send_nowait("there")
    with trio.CancelScope() as cancelled:
        cancelled.cancel()
        await channel.receive()
    assert len(channel) == 1
    with trio.CancelScope() as cancelled:
        cancelled.cancel()
        channel.receive_nowait()
        await channel.send("not sent")
    assert len(channel) == 0


async def test_receive_takes_what_is_there_without_waiting_and_ends_at_once_when_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # receive() tests the channel before it waits (it does not try receive_nowait): each
    # of its cases, in zero time on the autojump clock.
    channel = WorkChannel(1)
    channel.send_nowait("buffered")
    sent: list[str] = []

    async def sender() -> None:
        await channel.send("waiting sender")  # no room: waits for the receive below
        sent.append("in")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        assert await channel.receive() == "buffered"  # the sender's job takes the slot
        assert await channel.receive() == "waiting sender"
        assert trio.current_time() == start
    assert sent == ["in"]
    unbuffered = WorkChannel(0)

    async def handing() -> None:
        await unbuffered.send("by hand")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handing)
        await trio.testing.wait_all_tasks_blocked()
        assert await unbuffered.receive() == "by hand"  # size 0: straight from the sender
    channel.close()
    with trio.fail_after(1), pytest.raises(trio.EndOfChannel):
        await channel.receive()  # closed and empty: at once, no wait
