"""The load scenarios. Each fills a result dict as it goes (so a run stopped by its hard time limit still
reports what it measured) with the shared harness's field names where it has the same figure.

* ``fanout``: S members in one room, one more member publishing R msg/s for T s.
* ``rooms``: K rooms x M members, every member publishing r msg/s (K x M x r publishes/s in all).
* ``connect``: N connections, C handshakes at a time, each with its own real JWT: connects/s.
* ``idle``: N authenticated connections, each in two rooms, held H s: server RSS per connection.
* ``ramp``: S members, R raised x factor per step until p99 > limit or delivery < minimum: the curve.
* ``publish``: N clients each sending M messages, at most W unacknowledged: messages/s and ack latency.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from bench.client import LoadClient
from bench.load import Publisher, Run
from bench.procstat import delta, efficiency
from bench.stats import Samples

SETTLE_S = 0.5  # after the last join, before the measured phase (as the shared harness does)


def _receivers(joined: set[tuple[int, str]]) -> Counter[str]:
    return Counter(room for _, room in joined)


def _finish_phase(run: Run, result: dict[str, Any], phase_result: dict[str, Any], proc: dict[str, Any]) -> None:
    result.update(phase_result)
    result["proc"] = proc
    result.update(efficiency(phase_result["delivered"], proc))
    result["loadgen_event_loop_lag_ms"] = run.loop_lag()


async def fanout(run: Run, result: dict[str, Any], *, subs: int, rate: float, duration_s: float,
                 drain_s: float = 5.0, drain_max_s: float = 30.0, concurrency: int = 100) -> None:
    room = run.room("fanout")
    result["params"] = {"subs": subs, "rate": rate, "duration_s": duration_s, "payload_bytes": run.payload_bytes,
                        "room": room}
    before_connect = run.sampler.snapshot()
    publisher, joined = await _one_room(run, result, room, subs, concurrency)
    before = run.sampler.snapshot()
    result["proc_connect"] = delta(before_connect, before)
    phase = run.tracker.new_phase(rate)
    async with run.watching_loop_lag():
        await run.publish_open_loop([Publisher(publisher, room, len(joined) - 1)], rate, duration_s, phase)
        await run.drain(phase, drain_s, drain_max_s)
    _finish_phase(run, result, phase.result(), delta(before, run.sampler.snapshot()))


async def rooms(run: Run, result: dict[str, Any], *, rooms: int, members: int, member_rate: float,
                duration_s: float, drain_s: float = 5.0, drain_max_s: float = 30.0, concurrency: int = 100) -> None:
    result["params"] = {"rooms": rooms, "members": members, "member_rate": member_rate, "duration_s": duration_s,
                        "payload_bytes": run.payload_bytes, "aggregate_publish_rate": rooms * members * member_rate}
    before_connect = run.sampler.snapshot()
    clients, result["connect"] = await run.connect_many(rooms * members, concurrency)

    def room_of(client: LoadClient) -> str:
        return run.room(f"r{client.id // members}")

    joined, result["join"] = await run.join_all([(client, room_of(client)) for client in clients])
    per_room = _receivers(joined)
    publishers = []
    for client in clients:
        client.is_publisher = True
        room = room_of(client)
        publishers.append(Publisher(client, room, per_room[room] - ((client.id, room) in joined)))
    await asyncio.sleep(SETTLE_S)
    before = run.sampler.snapshot()
    result["proc_connect"] = delta(before_connect, before)
    aggregate_rate = rooms * members * member_rate
    phase = run.tracker.new_phase(aggregate_rate)
    async with run.watching_loop_lag():
        await run.publish_open_loop(publishers, aggregate_rate, duration_s, phase)
        await run.drain(phase, drain_s, drain_max_s)
    _finish_phase(run, result, phase.result(), delta(before, run.sampler.snapshot()))


async def connect(run: Run, result: dict[str, Any], *, conns: int, concurrency: int = 100) -> None:
    result["params"] = {"conns": conns, "concurrency": concurrency}
    before = run.sampler.snapshot()
    async with run.watching_loop_lag():
        clients, result["connect"] = await run.connect_many(conns, concurrency)
    proc = delta(before, run.sampler.snapshot())
    result["proc"] = proc
    server_cpu = proc.get("server", {}).get("cpu_s")
    result["connects_per_s"] = result["connect"]["rate_per_s"]
    result["connects_per_server_cpu_s"] = round(len(clients) / server_cpu) if server_cpu else None
    result["loadgen_event_loop_lag_ms"] = run.loop_lag()


async def idle(run: Run, result: dict[str, Any], *, conns: int, hold_s: float, room_size: int = 10,
               concurrency: int = 100) -> None:
    """Each connection joins room ``a<i // room_size>`` and room ``b<i % (conns // room_size)>``: two rooms
    of ``room_size`` members each, every pair of connections sharing at most one of them."""
    groups = max(1, conns // room_size)
    result["params"] = {"conns": conns, "hold_s": hold_s, "rooms_per_conn": 2, "room_size": room_size}
    before = run.sampler.snapshot()
    clients, result["connect"] = await run.connect_many(conns, concurrency)
    pairs = [(c, run.room(f"a{c.id // room_size}")) for c in clients]
    pairs += [(c, run.room(f"b{c.id % groups}")) for c in clients]
    joined, result["join"] = await run.join_all(pairs)
    connected = run.sampler.snapshot()
    result["proc_connect"] = delta(before, connected)
    disconnects_before = run.tracker.disconnects
    async with run.watching_loop_lag():
        await asyncio.sleep(hold_s)  # by design: idle connections are the thing measured
    held = run.sampler.snapshot()
    result["proc"] = delta(connected, held)
    still_open = sum(1 for c in clients if c.open)
    idle_result: dict[str, Any] = {"still_open": still_open,
                                   "disconnects_during_hold": run.tracker.disconnects - disconnects_before,
                                   "rooms_joined": len(joined)}
    for name in ("server", "redis", "loadgen"):
        start, end = before.processes.get(name), held.processes.get(name)
        if start is not None and end is not None and clients:
            idle_result[f"{name}_rss_bytes_per_conn"] = round((end.rss_kb - start.rss_kb) * 1024 / len(clients))
    result["idle"] = idle_result
    result["connects_per_s"] = result["connect"]["rate_per_s"]
    result["loadgen_event_loop_lag_ms"] = run.loop_lag()


@dataclass(frozen=True)
class RampLimits:
    start_rate: float = 10.0
    factor: float = 1.5
    step_s: float = 10.0
    step_drain_s: float = 3.0
    max_steps: int = 12
    p99_limit_ms: float = 500.0
    min_delivery: float = 0.999


async def ramp(run: Run, result: dict[str, Any], *, subs: int, limits: RampLimits, concurrency: int = 100) -> None:
    """One room of ``subs`` members; the publish rate is raised step by step. A step fails when its p99
    exceeds the limit or its delivery ratio falls below the minimum (a backlog still undelivered after
    the step's drain counts as not delivered); the ramp stops at the first failed step."""
    room = run.room("ramp")
    result["params"] = {"subs": subs, "ramp_start": limits.start_rate, "ramp_factor": limits.factor,
                        "step_s": limits.step_s, "max_steps": limits.max_steps, "p99_limit_ms": limits.p99_limit_ms,
                        "min_delivery": limits.min_delivery, "payload_bytes": run.payload_bytes, "room": room}
    publisher, joined = await _one_room(run, result, room, subs, concurrency)
    pub = Publisher(publisher, room, len(joined) - 1)
    steps: list[dict[str, Any]] = []
    result.update(steps=steps, best=None, stop_reason=f"max steps ({limits.max_steps}) reached")
    rate = limits.start_rate
    async with run.watching_loop_lag():
        for index in range(limits.max_steps):
            step_rate = round(rate)
            before = run.sampler.snapshot()
            phase = run.tracker.new_phase(step_rate)
            await run.publish_open_loop([pub], step_rate, limits.step_s, phase)
            await run.drain(phase, limits.step_drain_s, limits.step_drain_s)
            proc = delta(before, run.sampler.snapshot())
            figures = phase.result()
            latency = figures["latency_ms"]
            row = {"rate": step_rate, "deliveries_per_s": figures["deliveries_per_s"],
                   "delivery_ratio": figures["delivery_ratio"], "p50_ms": latency["p50"], "p90_ms": latency["p90"],
                   "p99_ms": latency["p99"], "max_ms": latency["max"], "duplicates": figures["duplicates"],
                   "out_of_order": figures["out_of_order"], "disconnects": run.tracker.disconnects,
                   "server_cpu_pct": proc.get("server", {}).get("cpu_pct"),
                   "redis_cpu_pct": proc.get("redis", {}).get("cpu_pct"),
                   "loadgen_cpu_pct": proc.get("loadgen", {}).get("cpu_pct"),
                   "host_busy_pct": proc.get("host", {}).get("busy_pct"),
                   "server_rss_kb": proc.get("server", {}).get("rss_kb_after"),
                   **efficiency(phase.delivered, proc)}
            passed = (latency["p99"] is not None and latency["p99"] <= limits.p99_limit_ms
                      and (figures["delivery_ratio"] or 0.0) >= limits.min_delivery)
            row["pass"] = passed
            steps.append(row)
            run.progress(f"step {index}: R={step_rate} msg/s -> {row['deliveries_per_s']} deliveries/s, "
                         f"ratio {row['delivery_ratio']}, p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, "
                         f"server {row['server_cpu_pct']}% cpu, loadgen {row['loadgen_cpu_pct']}% cpu "
                         f"{'PASS' if passed else 'FAIL'}")
            if not passed:
                result["stop_reason"] = (f"p99 {latency['p99']} ms > {limits.p99_limit_ms} ms at R={step_rate}"
                                         if latency["p99"] is None or latency["p99"] > limits.p99_limit_ms
                                         else f"delivery {figures['delivery_ratio']} < {limits.min_delivery} "
                                              f"at R={step_rate}")
                break
            result["best"] = row
            rate *= limits.factor
    best = result["best"]
    result["best_sustained_deliveries_per_s"] = best["deliveries_per_s"] if best else 0
    result["best_rate"] = best["rate"] if best else 0
    totals = [run.tracker.phases[i].result() for i in range(len(steps))]
    result["delivered"] = sum(t["delivered"] for t in totals)
    result["expected"] = sum(t["expected"] for t in totals)
    result["duplicates"] = sum(t["duplicates"] for t in totals)
    result["out_of_order"] = sum(t["out_of_order"] for t in totals)
    result["loadgen_event_loop_lag_ms"] = run.loop_lag()


async def publish(run: Run, result: dict[str, Any], *, clients: int, messages: int, window: int,
                  rooms: int = 10, concurrency: int = 100) -> None:
    """Closed loop: every client keeps at most ``window`` messages unacknowledged. Client c joins room
    ``c % rooms``; the members of a room receive each other's messages (counted as deliveries)."""
    result["params"] = {"clients": clients, "messages_per_client": messages, "window": window, "rooms": rooms}
    before_connect = run.sampler.snapshot()
    opened, result["connect"] = await run.connect_many(clients, concurrency)

    def room_of(client: LoadClient) -> str:
        return run.room(f"p{client.id % rooms}")

    joined, result["join"] = await run.join_all([(client, room_of(client)) for client in opened])
    per_room = _receivers(joined)
    senders = [c for c in opened if (c.id, room_of(c)) in joined]
    if not senders:
        raise RuntimeError("no client could join its room")
    ack_latency_ms = Samples()
    sent_at: dict[tuple[int, str], float] = {}
    slots = {c.id: asyncio.Semaphore(window) for c in senders}

    def on_ack(client: LoadClient, frame: dict[str, Any], received_at: float) -> None:
        started = sent_at.pop((client.id, str(frame.get("client_msg_id"))), None)
        if started is not None:
            ack_latency_ms.add((received_at - started) * 1000)
            slots[client.id].release()

    run.tracker.on_ack = on_ack
    await asyncio.sleep(SETTLE_S)
    before = run.sampler.snapshot()
    result["proc_connect"] = delta(before_connect, before)
    phase = run.tracker.new_phase()
    total = len(senders) * messages

    async def send_all(client: LoadClient) -> None:
        client.is_publisher = True
        pub = Publisher(client, room_of(client), per_room[room_of(client)] - 1)
        for _ in range(messages):
            await slots[client.id].acquire()
            cmid = f"c{client.seq}"
            sent_at[(client.id, cmid)] = time.perf_counter()
            if not run.publish_one(pub, phase, {"client_msg_id": cmid}):
                return

    started = time.perf_counter()
    phase.started_at = started
    async with run.watching_loop_lag(), run.reporting(
            lambda: f"publishing: {len(ack_latency_ms)}/{total} acked, delivered {phase.delivered}/{phase.expected}"):
        await asyncio.gather(*(send_all(client) for client in senders))
        for client in senders:  # every slot back: every message acked
            for _ in range(window):
                await slots[client.id].acquire()
    elapsed_s = time.perf_counter() - started
    phase.publish_s = elapsed_s
    await run.drain(phase, 5.0, 30.0)
    proc = delta(before, run.sampler.snapshot())
    _finish_phase(run, result, phase.result(), proc)
    result["acked"] = len(ack_latency_ms)
    result["messages_per_s"] = round(len(ack_latency_ms) / elapsed_s, 1)
    result["ack_latency_ms"] = ack_latency_ms.summary()
    server_cpu = proc.get("server", {}).get("cpu_s")
    result["messages_per_server_cpu_s"] = round(len(ack_latency_ms) / server_cpu) if server_cpu else None


async def _one_room(run: Run, result: dict[str, Any], room: str, subs: int, concurrency: int) -> tuple[Any, Any]:
    """``subs`` members and one publisher (the last connection) connected and joined to ``room``, settled:
    (the publisher, the joined (client id, room) pairs). Connect and join figures go into ``result``."""
    clients, result["connect"] = await run.connect_many(subs + 1, concurrency)
    if len(clients) < 2:
        raise RuntimeError(f"too few connections opened: {result['connect']}")
    publisher = clients[-1]
    publisher.is_publisher = True
    joined, result["join"] = await run.join_all([(client, room) for client in clients])
    if (publisher.id, room) not in joined:
        raise RuntimeError("the publisher could not join the room")
    await asyncio.sleep(SETTLE_S)
    return publisher, joined
