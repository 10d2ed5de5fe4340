"""MetaRouter (kvfs/meta_router.py) against in-process servers: it follows NOT_LEADER, sends a request
that never left elsewhere, resends an idempotent request whose reply was lost, and fails a
non-idempotent one with EIO instead of running it twice."""

from __future__ import annotations

import errno

import pytest
import trio
from cluster import free_port

from kvfs import protocol as P
from kvfs.meta_router import MetaRouter
from kvfs.rpc import NotLeader, RpcServer

ATTR = P.Attr(5, 0o100644, 1, 0, 0, 0, 0, 0, 0)


def leader_handlers(seen: list[int]) -> dict:
    async def getattr_(r, _):
        seen.append(P.META_GETATTR)
        return ATTR

    async def unlink(r, _):
        seen.append(P.META_UNLINK)
        return ATTR

    async def other(r, _):
        raise OSError(errno.ENOSYS, "not in this test")

    async def ha_status(r, _):
        return P.HaStatusReply("etcd", "", "leader", "", [], [])

    handlers = {m: other for m in P.META_METHODS}
    handlers.update({P.META_GETATTR: getattr_, P.META_UNLINK: unlink, P.META_HA_STATUS: ha_status})
    return handlers


def standby_handlers(leader: str, seen: list[int]) -> dict:
    async def refuse(r, _):
        seen.append(-1)
        raise NotLeader("a standby", leader)

    return {m: refuse for m in P.META_METHODS}


async def crashing_server(seen: list[int], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Reads one request per connection and drops the connection without a reply (a leader killed mid-request)."""
    async def handle(stream: trio.SocketStream) -> None:
        data = await stream.receive_some()
        if data:
            seen.append(P.unpack_header(bytes(data[:P.HEADER_SIZE])).method)
        await stream.aclose()

    await trio.serve_tcp(handle, 0, host="127.0.0.1", task_status=task_status)


async def hanging_server(seen: list[int], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Reads requests and never answers (a paused leader: the kernel still accepts and buffers)."""
    async def handle(stream: trio.SocketStream) -> None:
        data = await stream.receive_some()
        if data:
            seen.append(P.unpack_header(bytes(data[:P.HEADER_SIZE])).method)
        await trio.sleep_forever()

    await trio.serve_tcp(handle, 0, host="127.0.0.1", task_status=task_status)


async def start(nursery: trio.Nursery, handlers: dict) -> str:
    port = await nursery.start(RpcServer("meta", P.META_METHODS, handlers).serve, "127.0.0.1", 0)
    return f"127.0.0.1:{port}"


async def start_crashing(nursery: trio.Nursery, seen: list[int]) -> str:
    listeners = await nursery.start(crashing_server, seen)
    return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"


def run(body) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(20):
                await body(nursery)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_follows_not_leader_and_runs_once():
    async def body(nursery):
        led: list[int] = []
        leader = await start(nursery, leader_handlers(led))
        standby_seen: list[int] = []
        standby = await start(nursery, standby_handlers(leader, standby_seen))
        router = MetaRouter([standby, leader], timeout=5)
        assert (await router.request(P.META_UNLINK, P.Unlink(1, "f"))).ino == 5
        assert led == [P.META_UNLINK] and standby_seen == [-1]
        assert router.leader == leader
        await router.request(P.META_GETATTR, P.GetAttr(5))  # straight to the leader now
        assert standby_seen == [-1]
        router.close()

    run(body)


def test_never_sent_goes_elsewhere_even_when_not_idempotent():
    async def body(nursery):
        led: list[int] = []
        leader = await start(nursery, leader_handlers(led))
        router = MetaRouter([f"127.0.0.1:{free_port()}", leader], timeout=5)  # nobody listens on the first
        assert (await router.request(P.META_UNLINK, P.Unlink(1, "f"))).ino == 5
        assert led == [P.META_UNLINK]
        router.close()

    run(body)


def test_lost_reply_resends_idempotent_but_fails_the_others():
    async def body(nursery):
        led: list[int] = []
        crashed: list[int] = []
        leader = await start(nursery, leader_handlers(led))
        crashing = await start_crashing(nursery, crashed)
        router = MetaRouter([crashing, leader], timeout=5)
        assert (await router.request(P.META_GETATTR, P.GetAttr(5))) == ATTR
        assert crashed == [P.META_GETATTR] and led == [P.META_GETATTR]
        router.leader = crashing  # the client still believes the crashing meta leads
        with pytest.raises(OSError) as info:
            await router.request(P.META_UNLINK, P.Unlink(1, "f"))
        assert info.value.errno == errno.EIO and "unknown" in str(info.value)
        assert crashed == [P.META_GETATTR, P.META_UNLINK] and led == [P.META_GETATTR]  # never run twice
        router.close()

    run(body)


def test_no_leader_is_eio_after_the_failover_timeout():
    async def body(nursery):
        seen: list[int] = []
        a = await start(nursery, standby_handlers("", seen))
        b = await start(nursery, standby_handlers("", seen))
        router = MetaRouter([a, b], timeout=5, failover_timeout=1.0)
        with pytest.raises(OSError) as info:
            await router.request(P.META_GETATTR, P.GetAttr(5))
        assert info.value.errno == errno.EIO and "no meta leader" in str(info.value)
        assert len(seen) >= 2
        router.close()

    run(body)


def test_paused_leader_is_given_up_once_another_leads():
    async def body(nursery):
        led: list[int] = []
        hung: list[int] = []
        leader = await start(nursery, leader_handlers(led))
        listeners = await nursery.start(hanging_server, hung)
        paused = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        router = MetaRouter([paused, leader], timeout=30, suspect_after=0.5)
        router.leader = paused  # it led until it was paused
        t0 = trio.current_time()
        assert (await router.request(P.META_GETATTR, P.GetAttr(5))) == ATTR  # resent to the new leader
        assert trio.current_time() - t0 < 5 and hung == [P.META_GETATTR] and led == [P.META_GETATTR]
        router.leader = paused
        with pytest.raises(OSError) as info:  # not idempotent: it waits for its own timeout, then fails
            await router.request(P.META_UNLINK, P.Unlink(1, "f"), timeout=1.0)
        assert info.value.errno == errno.EIO and "unknown" in str(info.value)
        assert led == [P.META_GETATTR]  # the unlink never ran twice
        router.close()

    run(body)
