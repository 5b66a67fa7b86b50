"""The first thing anyone tries: connect, join, send, receive."""

from __future__ import annotations

from hub.app import App
from tests.conftest import url_of
from tests.helpers import connect


async def test_two_users_chat_in_a_channel(node: App) -> None:
    """A message sent by one member reaches the other, and the sender gets an ack with its id."""
    alice = await connect(url_of(node), "1")
    bob = await connect(url_of(node), "2")
    await alice.join("channel_general")
    await bob.join("channel_general")
    ack = await alice.say("channel_general", "hello", client_msg_id="m1")
    got = await bob.expect("chat_message")
    assert got["content"] == "hello" and got["id"] == ack["id"] and got["sender_id"] == "1"
    await alice.close()
    await bob.close()
