"""Structured logs: one line per connection open and close, JSON when asked, never a token."""

from __future__ import annotations

import logging

import orjson
import pytest

from hub.logs import JsonFormatter
from tests.conftest import NodeFactory, url_of
from tests.helpers import connect, mint, wait_until


async def test_connection_open_and_close_lines_carry_who_and_how_but_no_token(
        nodes: NodeFactory, caplog: pytest.LogCaptureFixture) -> None:
    """Opening and closing a connection logs one line each with user, ip, client_type, duration and
    close code, formatted as JSON by the JSON formatter, without the token."""
    caplog.set_level(logging.INFO, logger="hub.connections")
    node = await nodes.start()
    token = mint("42")
    client = await connect(url_of(node), "42", token=token)
    await client.close()
    await wait_until(lambda: any(r.getMessage() == "connection closed" for r in caplog.records),
                     what="the close line")
    lines = [orjson.loads(JsonFormatter().format(r)) for r in caplog.records if r.name == "hub.connections"]
    opened, closed = lines[0], lines[-1]
    assert opened["event"] == "open" and opened["user_id"] == "42" and opened["client_type"] == "test"
    assert opened["ip"] == "127.0.0.1"
    assert closed["event"] == "close" and closed["close_code"] == 1000 and closed["duration_s"] >= 0
    assert all(token not in orjson.dumps(line).decode() for line in lines)
