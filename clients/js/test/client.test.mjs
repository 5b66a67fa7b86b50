// The client against one real hub: chat between two clients, acks, errors, typing, presence, read
// receipts, update subscriptions, history, auth errors, and heartbeat-based dead-connection detection.

import assert from "node:assert/strict";
import { randomInt } from "node:crypto";
import { after, before, describe, test } from "node:test";

import { HubError } from "../streamhub.js";
import {
  FreezingProxy, Hub, WebSocket, cleanupPrefix, contents, makeClient, mintToken, newPrefix, newRoom, nextEvent,
  redis, sleep, waitFor, within,
} from "../test-support/helpers.mjs";

const prefix = newPrefix();
const hub = new Hub({ prefix });
const clients = [];
const proxies = [];

/** A connected client, closed after the file's tests. */
async function connected(user, options = {}) {
  const client = makeClient(options.url ?? hub.url, { token: mintToken(user), ...options });
  clients.push(client);
  await within(client.connect(), 10_000, `client ${user} to connect`);
  return client;
}

/** A WebSocket class that records every socket it creates (to count connection attempts). */
function countingWebSocket() {
  const created = [];
  class Counting extends WebSocket {
    constructor(...args) {
      super(...args);
      created.push(this);
    }
  }
  return { Counting, created };
}

before(async () => {
  await hub.start();
});

after(async () => {
  for (const client of clients) client.close();
  for (const proxy of proxies) await proxy.close();
  await hub.stop("SIGTERM");
  cleanupPrefix(prefix);
});

describe("chat", () => {
  test("two clients join, send and receive; the ack promise resolves with the stream id", { timeout: 30_000 }, async () => {
    const room = newRoom("chat");
    const a = await connected("1");
    const b = await connected("2");
    const joinedA = await within(a.joinRoom(room), 5_000, "join a");
    assert.equal(joinedA.type, "room_joined");
    assert.match(joinedA.epoch, /^[0-9a-f]+$/);
    await within(b.joinRoom(room), 5_000, "join b");

    const received = nextEvent(b, "chat_message", (m) => m.room === room && m.content === "hello");
    const ack = await within(a.sendMessage(room, "hello", { metadata: { reply_to: "0-1" } }), 5_000, "ack");
    assert.equal(ack.type, "ack");
    assert.match(ack.id, /^\d+-\d+$/);
    assert.match(ack.client_msg_id, /^c-/);
    assert.equal(ack.duplicate, undefined);
    const message = await received;
    assert.equal(message.id, ack.id, "the receiver sees the id the ack promised");
    assert.equal(message.sender_id, "1");
    assert.deepEqual(message.metadata, { reply_to: "0-1" });
    assert.equal(message.client_msg_id, ack.client_msg_id);
    // The sender's own echo moves its resume position (not the ack: README, Resume step 1).
    await waitFor(() => a.getRoom(room).lastId === ack.id, { label: "a's last id to reach the echo" });

    // Retrying with the same client_msg_id stores nothing new: the hub acks the original id.
    const retry = await within(a.sendMessage(room, "hello", { clientMsgId: ack.client_msg_id }), 5_000, "retry ack");
    assert.equal(retry.id, ack.id);
    assert.equal(retry.duplicate, true);
    await within(b.sendMessage(room, "sentinel"), 5_000, "sentinel");
    await waitFor(() => contents(a, room).includes("sentinel") && contents(b, room).includes("sentinel"), { label: "sentinel" });
    assert.deepEqual(contents(b, room), ["hello", "sentinel"]);
    assert.deepEqual(contents(a, room), ["hello", "sentinel"]);
  });

  test("errors reject the matching promise with the hub's code", { timeout: 30_000 }, async () => {
    const a = await connected("1");
    const notJoined = newRoom("nj");
    await assert.rejects(within(a.sendMessage(notJoined, "x")), (e) => e instanceof HubError && e.code === "not_joined");
    await assert.rejects(within(a.joinRoom("user_3_9")), (e) => e.code === "forbidden");
    await assert.rejects(within(a.joinRoom("Order_7")), (e) => e.code === "invalid_room");
    assert.deepEqual(a.rooms, [], "refused rooms are not kept for resume");
    // Refused locally, before anything is queued: a bad client_msg_id would be refused after every reconnect.
    await assert.rejects(a.sendMessage(notJoined, "x", { clientMsgId: "bad id!" }), (e) => e.code === "invalid_message");
    await assert.rejects(a.sendMessage(notJoined, ""), (e) => e.code === "invalid_message");
    assert.equal(a.pendingCount, 0);
  });

  test("history on join, replayed messages arrive once as events; fetchHistory pages over HTTP", { timeout: 30_000 }, async () => {
    const room = newRoom("hist");
    const a = await connected("1");
    await within(a.joinRoom(room));
    for (const text of ["h1", "h2", "h3"]) await within(a.sendMessage(room, text));
    const b = await connected("2");
    const joined = await within(b.joinRoom(room, { history: 2 }));
    assert.deepEqual(joined.messages.map((m) => m.content), ["h2", "h3"]);
    assert.deepEqual(contents(b, room), ["h2", "h3"], "replayed messages are emitted as chat_message events");
    assert.equal(b.getRoom(room).lastId, joined.last_id);
    const again = await within(b.joinRoom(room), 1_000, "join of a joined room");
    assert.equal(again, joined, "a joined room answers with its room_joined, without a round trip");

    const page = await within(b.fetchHistory(room, { limit: 2 }));
    assert.deepEqual(page.messages.map((m) => m.content), ["h3", "h2"], "newest first");
    assert.equal(page.has_more, true);
  });
});

describe("live indicators", () => {
  test("typing indicators and presence updates arrive", { timeout: 30_000 }, async () => {
    const room = newRoom("live");
    const a = await connected("11");
    const b = await connected("12");
    await within(a.joinRoom(room));
    await within(b.joinRoom(room));

    const typing = nextEvent(b, "typing_indicator", (e) => e.room === room && e.user_id === "11" && e.is_typing === true);
    assert.equal(a.startTyping(room), true);
    await typing;
    const stopped = nextEvent(b, "typing_indicator", (e) => e.room === room && e.user_id === "11" && e.is_typing === false);
    assert.equal(a.stopTyping(room), true);
    await stopped;
    assert.equal(a.startTyping(newRoom("nope")), false, "typing in a room not joined is not sent");

    const online = nextEvent(a, "presence_update", (e) => e.room === room && e.user_id === "13" && e.status === "online");
    const c = await connected("13");
    await within(c.joinRoom(room));
    await online;
    const away = nextEvent(a, "presence_update", (e) => e.room === room && e.user_id === "13" && e.status === "away");
    const set = await within(c.setPresence("away"));
    assert.equal(set.type, "presence_set");
    await away;
    const state = await within(a.presenceQuery(room));
    assert.deepEqual(state.users.find((u) => u.user_id === "13"), { user_id: "13", status: "away" });
  });

  test("markRead resolves with marked_read and the room gets a read receipt", { timeout: 30_000 }, async () => {
    const room = newRoom("read");
    const a = await connected("21");
    const b = await connected("22");
    await within(a.joinRoom(room));
    await within(b.joinRoom(room));
    const ack = await within(b.sendMessage(room, "please read"));
    const receipt = nextEvent(b, "read_receipt", (e) => e.room === room && e.user_id === "21");
    const marked = await within(a.markRead(room, ack.id));
    assert.equal(marked.type, "marked_read");
    assert.equal(marked.up_to, ack.id);
    assert.equal((await receipt).up_to, ack.id);
  });

  test("subscribeOrderUpdates delivers a backend's XADD event", { timeout: 30_000 }, async () => {
    const orderId = randomInt(1_000_000, 9_000_000);
    const room = `order_${orderId}`;
    const a = await connected("31", { token: mintToken("31", { claims: { rooms: [room] } }) });
    const subscribed = await within(a.subscribeOrderUpdates(orderId));
    assert.equal(subscribed.type, "subscribed");
    assert.equal(subscribed.room, room);
    const event = nextEvent(a, "order_status_update", (e) => e.room === room);
    redis("XADD", `${prefix}{${room}}:s`, "*", "type", "order_status_update", "sender_id", "orders-service",
      "data", JSON.stringify({ order_id: orderId, status: "shipped" }));
    assert.deepEqual((await event).data, { order_id: orderId, status: "shipped" });
    await assert.rejects(within(a.subscribeOrderUpdates(orderId + 1)), (e) => e.code === "forbidden");
    const unsubscribed = await within(a.unsubscribeOrderUpdates(orderId));
    assert.equal(unsubscribed.type, "unsubscribed");
  });
});

describe("auth errors", () => {
  for (const [label, token] of [
    ["a token signed with another secret", () => mintToken("41", { secret: "another-secret-0123456789abcdef0123456789" })],
    ["an expired token", () => mintToken("41", { ttlS: -60 })],
  ]) {
    test(`${label}: auth_error, state closed, no reconnect`, { timeout: 30_000 }, async () => {
      const { Counting, created } = countingWebSocket();
      const client = makeClient(hub.url, { token: token(), WebSocket: Counting });
      clients.push(client);
      await assert.rejects(within(client.connect(), 10_000, "connect to fail"), (e) => e.code === "unauthorized");
      assert.equal(client.state, "closed");
      assert.equal(client.events.authErrors.length, 1);
      assert.equal(client.events.authErrors[0].status, 401);
      assert.equal(client.events.states.at(-1).reason, "auth_error");
      await sleep(600); // several backoff periods (50 ms initial): a storm would show here
      assert.equal(created.length, 1, "one attempt only");

      // A fresh token and connect() resume normally.
      client.setToken(mintToken("41"));
      await within(client.connect());
      assert.equal(client.state, "open");
    });
  }

  test("with getToken, an auth error fetches a fresh token and connects", { timeout: 30_000 }, async () => {
    let calls = 0;
    const client = makeClient(hub.url, { getToken: async () => (++calls === 1 ? mintToken("42", { ttlS: -60 }) : mintToken("42")) });
    clients.push(client);
    await within(client.connect(), 10_000, "connect with the second token");
    assert.equal(calls, 2);
    assert.equal(client.events.authErrors.length, 1);
    assert.equal(client.state, "open");
  });

  test("token expiry on an open connection: getToken refreshes in place; a static token ends in auth_error", { timeout: 30_000 }, async (t) => {
    let issued = 0;
    const a = makeClient(hub.url, { getToken: async () => mintToken("44", { ttlS: ++issued === 1 ? 3 : 3600 }) });
    clients.push(a);
    const expiring = nextEvent(a, "token_expiring", () => true, 3_000).catch(() => null);
    const refreshed = nextEvent(a, "token_refreshed", () => true, 5_000);
    refreshed.catch(() => {});
    await within(a.connect());
    if (!(await expiring)) {
      t.skip("this hub does not enforce token expiry on open connections (no token_expiring)");
      return;
    }
    await refreshed;
    await sleep(3_500); // past the first token's exp: the refresh moved the deadline
    assert.equal(a.state, "open");
    assert.equal(a.stats.connects, 1);
    assert.equal(a.events.authErrors.length, 0);

    const b = makeClient(hub.url, { token: mintToken("45", { ttlS: 2 }) });
    clients.push(b);
    const authError = nextEvent(b, "auth_error", () => true, 8_000);
    await within(b.connect());
    assert.equal((await authError).code, 4502, "closed at exp: token expired");
    assert.equal(b.state, "closed", "a static token is not retried");
  });

  test("a getToken that keeps failing backs off instead of storming", { timeout: 30_000 }, async () => {
    const { Counting, created } = countingWebSocket();
    const client = makeClient(hub.url, {
      WebSocket: Counting,
      getToken: async () => mintToken("43", { ttlS: -60 }),
      backoff: { initialMs: 100, maxMs: 5_000, factor: 2, jitter: 1 },
      random: () => 0.5, // deterministic: half of each ceiling (50, 100, 200, 400, 800 ms)
    });
    clients.push(client);
    client.connect();
    await sleep(1_300);
    client.close();
    const delays = client.events.states.filter((s) => s.state === "reconnecting").map((s) => s.delayMs);
    assert.ok(created.length >= 3 && created.length <= 6, `attempts in 1.3 s: ${created.length}`);
    assert.deepEqual(delays, [50, 100, 200, 400, 800].slice(0, delays.length));
    assert.ok(client.events.authErrors.every((e, i) => e.attempt === i + 1));
  });
});

describe("dead connections", () => {
  test("heartbeat detects a connection that stopped carrying data, reconnects and resumes", { timeout: 30_000 }, async () => {
    const proxy = await new FreezingProxy(hub.port).listen();
    proxies.push(proxy);
    const room = newRoom("hb");
    const a = await connected("51", { url: proxy.url, heartbeatMs: 200 });
    const b = await connected("52");
    await within(a.joinRoom(room));
    await within(b.joinRoom(room));
    await within(b.sendMessage(room, "before"));
    await waitFor(() => contents(a, room).includes("before"), { label: "before" });

    const lost = nextEvent(a, "state", (s) => s.state === "reconnecting", 5_000);
    const frozenAt = Date.now();
    proxy.freeze(); // no FIN, no RST: only the heartbeat can tell
    for (const text of ["during-1", "during-2"]) await within(b.sendMessage(room, text));
    const state = await lost;
    const detectedMs = Date.now() - frozenAt;
    assert.equal(state.reason, "heartbeat timeout");
    assert.ok(detectedMs >= 300 && detectedMs <= 2_000, `detected after ${detectedMs} ms (heartbeat 200 ms)`);

    const rejoined = await within(nextEvent(a, "room_joined", (f) => f.room === room), 10_000, "resume");
    assert.equal(rejoined.recovered, true);
    await within(b.sendMessage(room, "after"));
    await waitFor(() => contents(a, room).includes("after"), { label: "after" });
    assert.deepEqual(contents(a, room), ["before", "during-1", "during-2", "after"]);
    assert.equal(a.events.gaps.length, 0);
  });

  test("a send whose ack was lost is re-sent after reconnect and stored once", { timeout: 30_000 }, async () => {
    const proxy = await new FreezingProxy(hub.port).listen();
    proxies.push(proxy);
    const room = newRoom("inflight");
    const a = await connected("61", { url: proxy.url, heartbeatMs: 300 });
    const b = await connected("62");
    await within(a.joinRoom(room));
    await within(b.joinRoom(room));

    proxy.freeze({ up: false, down: true }); // the hub gets the message; its ack never comes back
    const stored = nextEvent(b, "chat_message", (m) => m.room === room && m.content === "inflight");
    const sent = a.sendMessage(room, "inflight");
    const original = await stored;
    const ack = await within(sent, 10_000, "the ack after the reconnect");
    assert.equal(ack.id, original.id, "the retry got the original id");
    assert.equal(ack.duplicate, true, "the hub recognised the retry by its client_msg_id");

    await within(b.sendMessage(room, "sentinel"));
    await waitFor(() => contents(a, room).includes("sentinel") && contents(b, room).includes("sentinel"), { label: "sentinel" });
    assert.deepEqual(contents(b, room), ["inflight", "sentinel"]);
    assert.deepEqual(contents(a, room), ["inflight", "sentinel"], "the echo came once, in the resume");
  });
});
