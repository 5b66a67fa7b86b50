"""``hubctl bench``: a load generator that speaks the hub's protocol, many connections in one process.

Modules, one role each: :mod:`bench.client` (one lean WebSocket connection: websockets' sans-I/O protocol
on a uvloop transport, orjson, no compression, no task per connection), :mod:`bench.stats` (delivery
accounting and latency percentiles), :mod:`bench.procstat` (CPU and RSS from /proc), :mod:`bench.target`
(the hub under test: started here or given by URL; key clean-up), :mod:`bench.load` (connecting, joining,
open-loop publishing, draining), :mod:`bench.scenarios` (fanout, rooms, connect, idle, ramp, publish),
:mod:`bench.archive` (stream -> PostgreSQL), :mod:`bench.report` (medians, the readable summary),
:mod:`bench.plot` (latency vs load), :mod:`bench.nullhub` (a calibration server: the generator's ceiling).

It lives beside ``hub`` rather than inside it because the archive scenario drives ``consumers`` (and
``hub`` never imports ``consumers``). Measurements follow the shared side-by-side harness (its README,
"What is measured, and how"), so figures are comparable with its peers.
"""
