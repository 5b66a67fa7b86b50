"""CPU seconds and RSS of processes from /proc, summed over a process and its descendants (a hub started
with ``--workers N`` counts whole), the host's CPU from /proc/stat, and this generator's own CPU.

A :class:`Snapshot` is taken at phase boundaries; :func:`delta` turns two into per-process CPU seconds,
CPU % of one core over the wall time between them, and RSS at both ends.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


@dataclass(frozen=True)
class ProcUsage:
    cpu_s: float
    rss_kb: int
    hwm_kb: int
    processes: int


def _read_one(pid: int) -> ProcUsage | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
        status = (PROC / str(pid) / "status").read_text()
    except OSError:
        return None
    # Fields after the command name (which may hold spaces and parentheses): state is field 3.
    fields = stat[stat.rindex(")") + 2:].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
    rss_kb = hwm_kb = 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm_kb = int(line.split()[1])
    return ProcUsage(cpu_s, rss_kb, hwm_kb, 1)


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    stack = list(children.get(pid, []))
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(children.get(child, []))
    return found


def read_tree(pid: int) -> ProcUsage | None:
    """``pid`` and its descendants, summed; None when ``pid`` is gone."""
    root = _read_one(pid)
    if root is None:
        return None
    cpu_s, rss_kb, hwm_kb, processes = root.cpu_s, root.rss_kb, root.hwm_kb, 1
    for child in descendants(pid):
        usage = _read_one(child)
        if usage is not None:
            cpu_s += usage.cpu_s
            rss_kb += usage.rss_kb
            hwm_kb += usage.hwm_kb
            processes += 1
    return ProcUsage(cpu_s, rss_kb, hwm_kb, processes)


def _host_jiffies() -> tuple[int, int, int] | None:
    """(busy, total, softirq) jiffies of all CPUs, from the first line of /proc/stat."""
    try:
        first = (PROC / "stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in first[:8])
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait, softirq


def _self_usage() -> ProcUsage:
    times = os.times()
    rss_kb = 0
    try:
        for line in (PROC / "self" / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
    except OSError:
        pass
    return ProcUsage(times.user + times.system, rss_kb, 0, 1)


@dataclass
class Snapshot:
    at: float
    processes: dict[str, ProcUsage | None] = field(default_factory=dict)
    host: tuple[int, int, int] | None = None


class Sampler:
    """Snapshots of the named processes (``server``, ``redis``) plus ``loadgen`` (this process)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def snapshot(self) -> Snapshot:
        snap = Snapshot(time.perf_counter(), host=_host_jiffies())
        for name, pid in self.pids.items():
            snap.processes[name] = read_tree(pid)
        snap.processes["loadgen"] = _self_usage()
        return snap


def delta(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    """Per process: CPU seconds and % of one core between the snapshots, RSS (KiB) at both ends; and
    the host's busy/softirq % of one core (up to 100 x cores: loopback softirq is charged to no process)."""
    wall_s = max(after.at - before.at, 1e-9)
    out: dict[str, Any] = {"wall_s": round(wall_s, 2)}
    for name, end in after.processes.items():
        start = before.processes.get(name)
        if start is None or end is None:
            out[name] = {"alive": end is not None}
            continue
        cpu_s = end.cpu_s - start.cpu_s
        entry: dict[str, Any] = {"cpu_s": round(cpu_s, 3), "cpu_pct": round(100 * cpu_s / wall_s, 1),
                                 "rss_kb_before": start.rss_kb, "rss_kb_after": end.rss_kb}
        if end.hwm_kb:
            entry["hwm_kb"] = end.hwm_kb
        if end.processes > 1:
            entry["processes"] = end.processes
        out[name] = entry
    shards = [entry for name, entry in out.items() if name.startswith("redis@") and "cpu_s" in entry]
    if shards and "redis" not in out:  # a Redis Cluster's masters, summed where one Redis would be reported
        out["redis"] = {"cpu_s": round(sum(e["cpu_s"] for e in shards), 3),
                        "cpu_pct": round(sum(e["cpu_pct"] for e in shards), 1),
                        "rss_kb_before": sum(e["rss_kb_before"] for e in shards),
                        "rss_kb_after": sum(e["rss_kb_after"] for e in shards), "processes": len(shards)}
    if before.host is not None and after.host is not None and after.host[1] > before.host[1]:
        cores = os.cpu_count() or 1
        per_core_total = (after.host[1] - before.host[1]) / cores
        out["host"] = {"cores": cores,
                       "busy_pct": round(100 * (after.host[0] - before.host[0]) / per_core_total, 1),
                       "softirq_pct": round(100 * (after.host[2] - before.host[2]) / per_core_total, 1)}
    return out


def efficiency(deliveries: int, proc: dict[str, Any]) -> dict[str, int | None]:
    """Deliveries per server CPU-second (and per server + Redis CPU-second) over a measured phase."""
    server_cpu = proc.get("server", {}).get("cpu_s")
    redis_cpu = proc.get("redis", {}).get("cpu_s")
    loadgen_cpu = proc.get("loadgen", {}).get("cpu_s")
    return {
        "deliveries_per_server_cpu_s": round(deliveries / server_cpu) if server_cpu else None,
        "deliveries_per_server_redis_cpu_s": (round(deliveries / (server_cpu + redis_cpu))
                                              if server_cpu is not None and redis_cpu is not None
                                              and server_cpu + redis_cpu > 0 else None),
        "deliveries_per_loadgen_cpu_s": round(deliveries / loadgen_cpu) if loadgen_cpu else None,
    }
