// The React hooks, rendered with react-test-renderer (no DOM) against a real hub: connection state,
// sendMessage, a room's messages (history, live, StrictMode's double effects), and the refill from
// history after a gap.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import React from "react";
import TestRenderer, { act } from "react-test-renderer";

import { mergeMessages, useHub, useRoomMessages } from "../react.js";
import {
  Hub, WebSocket, cleanupPrefix, contents, freePort, makeClient, mintToken, newPrefix, newRoom, nextEvent, redis,
  waitFor, within,
} from "../test-support/helpers.mjs";

// Updates arrive from WebSocket callbacks, outside act(); the test polls for them instead.
globalThis.IS_REACT_ACT_ENVIRONMENT = false;

const prefix = newPrefix();
let hub;
const clients = [];
const renderers = [];

before(async () => {
  hub = new Hub({ prefix, port: await freePort() });
  await hub.start();
});

after(async () => {
  for (const renderer of renderers) renderer.unmount();
  for (const client of clients) client.close();
  await hub.stop("SIGTERM");
  cleanupPrefix(prefix);
});

/** Render a component using both hooks; `view.current` is what the last render saw. */
function renderChat({ user, room, strict = false, history = 10 }) {
  const view = { current: null, renders: 0 };
  function Chat() {
    const hub_ = useHub({
      url: hub.url, token: mintToken(user), WebSocket, backoff: { initialMs: 50, maxMs: 300 },
    });
    const messages = useRoomMessages(hub_.client, room, { history });
    view.current = { ...hub_, messages };
    view.renders++;
    return null;
  }
  const element = React.createElement(Chat);
  let renderer;
  act(() => {
    renderer = TestRenderer.create(strict ? React.createElement(React.StrictMode, null, element) : element);
  });
  renderers.push(renderer);
  view.renderer = renderer;
  return view;
}

async function otherMember(user, room) {
  const client = makeClient(hub.url, { token: mintToken(user) });
  clients.push(client);
  await within(client.connect());
  await within(client.joinRoom(room));
  return client;
}

test("mergeMessages keeps one message per id, in id order, bounded", () => {
  const m = (id) => ({ id, type: "chat_message" });
  assert.deepEqual(mergeMessages([m("1-0")], [m("2-0")]).map((x) => x.id), ["1-0", "2-0"]);
  assert.deepEqual(mergeMessages([m("1-0"), m("3-0")], [m("2-0"), m("3-0")]).map((x) => x.id), ["1-0", "2-0", "3-0"]);
  assert.deepEqual(mergeMessages([m("1-0"), m("2-0")], [m("3-0")], 2).map((x) => x.id), ["2-0", "3-0"]);
});

test("useHub connects; useRoomMessages shows history then live messages; sendMessage acks", { timeout: 30_000 }, async () => {
  const room = newRoom("react");
  const b = await otherMember("202", room);
  for (const text of ["h1", "h2"]) await within(b.sendMessage(room, text));

  const view = renderChat({ user: "201", room });
  await waitFor(() => view.current.state === "open", { label: "state open" });
  await waitFor(() => view.current.messages.length === 2, { label: "history" });
  assert.deepEqual(view.current.messages.map((m) => m.content), ["h1", "h2"]);

  await within(b.sendMessage(room, "live"));
  await waitFor(() => view.current.messages.length === 3, { label: "live message" });
  const ack = await within(view.current.sendMessage(room, "from the hook"));
  assert.match(ack.id, /^\d+-\d+$/);
  await waitFor(() => view.current.messages.at(-1)?.content === "from the hook", { label: "own echo" });
  await waitFor(() => contents(b, room).includes("from the hook"), { label: "b got it" });
  assert.deepEqual(view.current.messages.map((m) => m.content), ["h1", "h2", "live", "from the hook"]);

  const client = view.current.client;
  act(() => view.renderer.unmount());
  assert.equal(client.state, "closed", "unmount closes the client");
});

test("StrictMode's double effects (connect, close, connect): the room works, each message once", { timeout: 30_000 }, async () => {
  const room = newRoom("strict");
  const b = await otherMember("212", room);
  const view = renderChat({ user: "211", room, strict: true, history: 0 });
  await waitFor(() => view.current.state === "open" && view.current.client.getRoom(room)?.live, { label: "joined" });
  await within(b.sendMessage(room, "once"));
  await waitFor(() => view.current.messages.length === 1, { label: "message" });
  await within(b.sendMessage(room, "twice?"));
  await waitFor(() => view.current.messages.length === 2, { label: "second message" });
  assert.deepEqual(view.current.messages.map((m) => m.content), ["once", "twice?"]);
  const presence = await within(b.presenceQuery(room));
  assert.deepEqual(presence.users.map((u) => u.user_id).sort(), ["211", "212"]);
  assert.equal(view.current.client.state, "open");
});

test("after a gap the room's messages are replaced by fresh history", { timeout: 60_000 }, async () => {
  const room = newRoom("reactgap");
  const view = renderChat({ user: "221", room, history: 0 });
  await waitFor(() => view.current.client.getRoom(room)?.live, { label: "joined" });
  await within(view.current.sendMessage(room, "old"));
  await waitFor(() => view.current.messages.length === 1, { label: "old" });

  const client = view.current.client;
  const lost = nextEvent(client, "state", (s) => s.state === "reconnecting", 20_000);
  await hub.stop("SIGTERM");
  await lost;
  const keys = redis("--scan", "--pattern", `${prefix}{${room}}*`).split("\n").filter(Boolean);
  redis("del", ...keys); // Redis lost the room
  const gap = nextEvent(client, "gap", (g) => g.room === room, 30_000);
  await hub.start();
  await gap;
  await waitFor(() => view.current.messages.length === 0, { label: "stale messages dropped (history is empty now)" });
  await within(view.current.sendMessage(room, "new"));
  await waitFor(() => view.current.messages.length === 1, { label: "new" });
  assert.deepEqual(view.current.messages.map((m) => m.content), ["new"]);
});
