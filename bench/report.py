"""Results: the medians over several runs (and the worst of the correctness counts), and the readable
summary printed on stderr. The JSON shape (``--json``):

    {"scenario": ..., "runs": [<one result per run>], "median": {<dotted path>: median over runs},
     "worst": {"lost": max, "duplicates": max, "out_of_order": max, "disconnects": max, "aborted": n}}

``median`` covers every numeric figure present in every run (``latency_ms.p99``,
``deliveries_per_server_cpu_s``, ``proc.server.cpu_s``, ...); lists (ramp steps) stay in the runs.
"""

from __future__ import annotations

import statistics
from typing import Any

WORST_OF = ("lost", "duplicates", "out_of_order", "disconnects", "publish_failed", "late_after_drain")


def flatten(result: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested result as {dotted.path: value} (booleans and lists left out)."""
    flat: dict[str, float] = {}
    for key, value in result.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{path}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[path] = value
    return flat


def aggregate(scenario: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    flats = [flatten(run) for run in runs]
    common = set(flats[0]).intersection(*flats[1:]) if flats else set()
    median = {path: _round(statistics.median(flat[path] for flat in flats)) for path in sorted(common)
              if path != "run"}
    worst: dict[str, Any] = {key: max(int(run.get(key) or 0) for run in runs) for key in WORST_OF
                             if any(key in run for run in runs)}
    worst["aborted"] = sum(1 for run in runs if run.get("aborted"))
    return {"scenario": scenario, "runs": runs, "median": median, "worst": worst}


def _round(value: float) -> float:
    return round(value, 3) if isinstance(value, float) else value


def summary(result: dict[str, Any]) -> str:
    """A few lines a person reads: outcome, latency, CPU and memory, efficiency, trouble."""
    lines = [f"== {result.get('scenario')} run {result.get('run')}: {result.get('params', {})}"]
    connect = result.get("connect")
    if connect:
        lines.append(f"   connect: {connect['ok']}/{connect['attempted']} in {connect['elapsed_s']} s "
                     f"({connect['rate_per_s']}/s, p50 {connect['latency_ms']['p50']} ms, "
                     f"p99 {connect['latency_ms']['p99']} ms)"
                     + (f" FAILED {connect['failed']} {connect['errors']}" if connect["failed"] else ""))
    join = result.get("join")
    if join and (join["failed"] or join["closed_before_publish"]):
        lines.append(f"   join: {join}")
    if "latency_ms" in result and "delivery_ratio" in result:
        ratio = result["delivery_ratio"]
        lines.append(f"   delivery: {result['delivered']}/{result['expected']} "
                     f"({100 * ratio:.3f}%)" if ratio is not None else "   delivery: nothing expected")
        lines[-1] += (f" dup {result['duplicates']} ooo {result['out_of_order']} late {result['late_after_drain']}"
                      f" | {result['deliveries_per_s']} deliveries/s at {result['publish_rate']} publishes/s")
        latency = result["latency_ms"]
        lines.append(f"   latency ms: p50 {latency['p50']} p90 {latency['p90']} p99 {latency['p99']} "
                     f"max {latency['max']}")
    if "ack_latency_ms" in result:
        ack = result["ack_latency_ms"]
        lines.append(f"   publish: {result['acked']} acked, {result['messages_per_s']} messages/s, ack p50 "
                     f"{ack['p50']} ms, p99 {ack['p99']} ms, {result['messages_per_server_cpu_s']} per server CPU-s")
    if "steps" in result:
        lines.append(f"   ramp: best sustained {result['best_sustained_deliveries_per_s']} deliveries/s "
                     f"(R={result['best_rate']}); stop: {result['stop_reason']}")
    if "idle" in result:
        lines.append(f"   idle: {result['idle']}")
    if "connects_per_server_cpu_s" in result:
        lines.append(f"   connects per server CPU-second: {result['connects_per_server_cpu_s']}")
    proc = result.get("proc")
    if proc:
        parts = []
        for name in ("server", "redis", "loadgen"):
            entry = proc.get(name)
            if entry and "cpu_s" in entry:
                parts.append(f"{name} {entry['cpu_s']} s cpu ({entry['cpu_pct']}%), "
                             f"rss {entry['rss_kb_after'] // 1024} MiB")
        lines.append(f"   {' | '.join(parts)} over {proc['wall_s']} s")
        if "host" in proc:
            lines.append(f"   host: busy {proc['host']['busy_pct']}% of {proc['host']['cores'] * 100}% "
                         f"(softirq {proc['host']['softirq_pct']}%)")
    if result.get("deliveries_per_server_cpu_s") is not None:
        lines.append(f"   deliveries per server CPU-second: {result['deliveries_per_server_cpu_s']} "
                     f"(server+redis: {result.get('deliveries_per_server_redis_cpu_s')}); "
                     f"the generator absorbed {result.get('deliveries_per_loadgen_cpu_s')} per its CPU-second")
    if "archiver_rows_per_s" in result:
        lines.append(f"   archive: raw COPY {result['raw_copy_rows_per_s']:,} rows/s, archiver "
                     f"{result['archiver_rows_per_s']:,} rows/s, ratio {result['ratio']}")
    lag = result.get("loadgen_event_loop_lag_ms")
    if lag and lag.get("max") is not None:
        lines.append(f"   generator event-loop lag: p99 {lag['p99']} ms, max {lag['max']} ms")
    if result.get("disconnects") or result.get("errors"):
        lines.append(f"   disconnects {result.get('disconnects')} {result.get('close_codes')} "
                     f"(publishers: {result.get('publisher_disconnects')}) errors {result.get('errors')}")
    if result.get("aborted"):
        lines.append(f"   ABORTED: {result['aborted']}")
    return "\n".join(lines)


# The figures the median line names, per scenario (all medians are in the JSON).
HEADLINE = {
    "fanout": ("delivery_ratio", "latency_ms.p50", "latency_ms.p99", "deliveries_per_s",
               "deliveries_per_server_cpu_s", "proc.server.cpu_pct"),
    "rooms": ("delivery_ratio", "latency_ms.p50", "latency_ms.p99", "deliveries_per_s",
              "deliveries_per_server_cpu_s", "proc.server.cpu_pct"),
    "connect": ("connects_per_s", "connect.latency_ms.p99", "connects_per_server_cpu_s"),
    "idle": ("idle.server_rss_bytes_per_conn", "connects_per_s", "idle.still_open"),
    "ramp": ("best_sustained_deliveries_per_s", "best_rate"),
    "calibrate": ("best_sustained_deliveries_per_s", "best_rate"),
    "publish": ("messages_per_s", "ack_latency_ms.p50", "ack_latency_ms.p99", "messages_per_server_cpu_s"),
    "archive": ("raw_copy_rows_per_s", "archiver_rows_per_s", "ratio"),
}


def median_line(aggregated: dict[str, Any]) -> str:
    median = aggregated["median"]
    names = HEADLINE.get(aggregated["scenario"], ())
    shown = ", ".join(f"{name} {median[name]:,}" if isinstance(median.get(name), int)
                      else f"{name} {median.get(name)}" for name in names)
    return (f"== {aggregated['scenario']}: median of {len(aggregated['runs'])} run(s): {shown}; "
            f"worst: {aggregated['worst']}")
