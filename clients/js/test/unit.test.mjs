// Unit tests: the backoff delay function, stream id ordering, and client behaviour that the real hub
// cannot be made to show on demand (4501 close, unanswered pings, retryable errors), against a scripted
// WebSocket server from the `ws` package. No Python hub here.

import assert from "node:assert/strict";
import { after, describe, test } from "node:test";

import { WebSocketServer } from "ws";

import { DEFAULT_BACKOFF, HubClient, backoffDelay, compareIds, newClientMsgId } from "../streamhub.js";
import { WebSocket, freePort, mintToken, nextEvent, sleep, waitFor, within } from "../test-support/helpers.mjs";

/** A small deterministic PRNG (mulberry32), so the jitter tests never flake. */
function seeded(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

describe("backoffDelay", () => {
  const options = { initialMs: 100, maxMs: 2_000, factor: 2 };

  test("the ceiling grows exponentially and is capped", () => {
    const top = () => 0; // random() = 0 gives the ceiling itself
    assert.deepEqual([1, 2, 3, 4, 5, 6, 7].map((n) => backoffDelay(n, options, top)), [100, 200, 400, 800, 1600, 2000, 2000]);
    assert.equal(backoffDelay(10_000, options, top), 2000, "no overflow for huge attempt numbers");
    assert.equal(backoffDelay(0, options, top), 100, "attempt numbers below 1 count as 1");
  });

  test("full jitter by default: uniform over [0, ceiling], different every time", () => {
    assert.equal(DEFAULT_BACKOFF.jitter, 1);
    const random = seeded(42);
    for (const attempt of [1, 3, 5, 8]) {
      const ceiling = Math.min(2_000, 100 * 2 ** (attempt - 1));
      const samples = Array.from({ length: 2_000 }, () => backoffDelay(attempt, options, random));
      assert.ok(samples.every((d) => d >= 0 && d <= ceiling), `attempt ${attempt} within [0, ${ceiling}]`);
      assert.ok(Math.min(...samples) < 0.05 * ceiling && Math.max(...samples) > 0.95 * ceiling, "spread over the range");
      const mean = samples.reduce((s, d) => s + d, 0) / samples.length;
      assert.ok(Math.abs(mean - ceiling / 2) < 0.05 * ceiling, `mean ${mean} near ${ceiling / 2}`);
      assert.ok(new Set(samples).size > Math.min(ceiling, 2_000) * 0.3, "jittered, not a few fixed values");
    }
  });

  test("jitter fraction: 0 is none, 0.5 keeps the upper half", () => {
    const random = seeded(7);
    for (let i = 0; i < 500; i++) {
      assert.equal(backoffDelay(3, { ...options, jitter: 0 }, random), 400);
      const half = backoffDelay(3, { ...options, jitter: 0.5 }, random);
      assert.ok(half >= 200 && half <= 400);
    }
    assert.equal(backoffDelay(3, { ...options, jitter: false }, random), 400);
  });

  test("mean delays grow with the attempt number", () => {
    const random = seeded(1);
    const mean = (n) => Array.from({ length: 1_000 }, () => backoffDelay(n, options, random)).reduce((s, d) => s + d, 0) / 1_000;
    const means = [1, 2, 3, 4, 5].map(mean);
    for (let i = 1; i < means.length; i++) assert.ok(means[i] > means[i - 1] * 1.6, `means ${means}`);
  });
});

describe("ids", () => {
  test("compareIds orders stream ids numerically, exactly", () => {
    assert.ok(compareIds("9-0", "10-0") < 0);
    assert.ok(compareIds("1732550400000-1", "1732550400000-0") > 0);
    assert.ok(compareIds("1732550400000-10", "1732550400000-9") > 0);
    assert.equal(compareIds("5-5", "5-5"), 0);
    // Beyond 2^53, where Number() would round both to the same value.
    assert.ok(compareIds("1-9007199254740993", "1-9007199254740992") > 0);
  });

  test("generated client_msg_ids are unique and valid for the hub", () => {
    const ids = new Set(Array.from({ length: 1_000 }, newClientMsgId));
    assert.equal(ids.size, 1_000);
    for (const id of ids) assert.match(id, /^[A-Za-z0-9_.:-]{1,64}$/);
  });
});

// ---------------------------------------------------------------------------------------------- fake hub

const servers = [];
const clients = [];

after(async () => {
  for (const client of clients) client.close();
  for (const server of servers) {
    for (const socket of server.clients) socket.terminate();
    await new Promise((resolve) => server.close(resolve));
  }
});

/** A scripted server: sends connection_established, then hands every parsed frame to `onFrame`. */
async function fakeHub({ heartbeatS = 20, onConnect = () => {}, onFrame = () => {} } = {}) {
  const server = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await new Promise((resolve) => server.once("listening", resolve));
  servers.push(server);
  server.connections = 0;
  server.frames = [];
  server.on("connection", (socket, request) => {
    server.connections++;
    socket.send(JSON.stringify({
      type: "connection_established", connection_id: `fake-${server.connections}`, user_id: "1",
      server_time: new Date().toISOString(), heartbeat_s: heartbeatS,
    }));
    onConnect(socket, server.connections, request);
    socket.on("message", (data) => {
      const frame = JSON.parse(String(data));
      server.frames.push(frame);
      onFrame(socket, frame);
    });
  });
  server.url = `ws://127.0.0.1:${server.address().port}/ws/connect`;
  return server;
}

function client(url, options = {}) {
  const c = new HubClient({ url, WebSocket, token: mintToken("1"), backoff: { initialMs: 20, maxMs: 100 }, ...options });
  clients.push(c);
  return c;
}

describe("client behaviour", () => {
  test("a 4501 close is an auth error: no reconnect with a static token", { timeout: 10_000 }, async () => {
    const server = await fakeHub({ onConnect: (socket) => setTimeout(() => socket.close(4501, "token expired"), 20) });
    const c = client(server.url);
    const authError = nextEvent(c, "auth_error");
    await within(c.connect());
    assert.equal((await authError).code, 4501);
    await waitFor(() => c.state === "closed", { label: "closed" });
    await sleep(300);
    assert.equal(server.connections, 1);
  });

  test("a 4501 close with getToken: a fresh token, then a new connection", { timeout: 10_000 }, async () => {
    let tokens = 0;
    const server = await fakeHub({ onConnect: (socket, n) => { if (n === 1) setTimeout(() => socket.close(4501, "expired"), 20); } });
    const c = client(server.url, { token: undefined, getToken: async () => { tokens++; return mintToken("1"); } });
    await within(c.connect());
    await waitFor(() => server.connections === 2 && c.state === "open", { label: "second connection" });
    assert.equal(tokens, 2);
  });

  test("maxAttempts stops after that many failed reconnects and says so", { timeout: 10_000 }, async () => {
    const port = await freePort(); // nothing listens
    const c = client(`ws://127.0.0.1:${port}/ws/connect`, { maxAttempts: 2 });
    const states = [];
    c.on("state", (s) => states.push(s));
    await assert.rejects(within(c.connect()), (e) => e.code === "max_attempts");
    assert.deepEqual(states.map((s) => [s.state, s.attempt]), [["connecting", 0], ["reconnecting", 1], ["reconnecting", 2], ["closed", 2]]);
    assert.equal(states.at(-1).reason, "max_attempts");
  });

  test("heartbeat: pings every heartbeat_s and reconnects when nothing comes back for two intervals", { timeout: 10_000 }, async () => {
    const server = await fakeHub({ heartbeatS: 0.1 }); // never answers pings
    const c = client(server.url);
    const lost = nextEvent(c, "state", (s) => s.state === "reconnecting");
    const start = Date.now();
    await within(c.connect());
    const state = await lost;
    const elapsed = Date.now() - start;
    assert.equal(state.reason, "heartbeat timeout");
    assert.ok(elapsed >= 190 && elapsed < 1_000, `dead after ${elapsed} ms`);
    assert.ok(server.frames.some((f) => f.type === "ping"), "pings were sent");
    await waitFor(() => server.connections >= 2, { label: "reconnect" });
  });

  test("a retryable error is retried with the same client_msg_id; an ack timeout rejects", { timeout: 10_000 }, async () => {
    let refusals = 0;
    const server = await fakeHub({
      onFrame: (socket, frame) => {
        if (frame.type === "join_room") {
          socket.send(JSON.stringify({ type: "room_joined", room: frame.room, epoch: "e1", last_id: "0-0", recovered: false, messages: [], request_id: frame.request_id }));
        } else if (frame.type === "chat_message" && frame.content === "retry me") {
          if (refusals++ === 0) {
            socket.send(JSON.stringify({ type: "error", code: "rate_limited", retryable: true, retry_after_ms: 30, request_type: "chat_message", request_id: frame.request_id }));
          } else {
            socket.send(JSON.stringify({ type: "ack", room: frame.room, id: "5-0", client_msg_id: frame.client_msg_id, request_id: frame.request_id }));
          }
        } // "never acked" gets no reply
      },
    });
    const c = client(server.url, { ackTimeoutMs: 200 });
    await within(c.connect());
    await within(c.joinRoom("channel_x"));
    const ack = await within(c.sendMessage("channel_x", "retry me"));
    assert.equal(ack.id, "5-0");
    const sent = server.frames.filter((f) => f.content === "retry me");
    assert.equal(sent.length, 2);
    assert.equal(sent[0].client_msg_id, sent[1].client_msg_id);
    await assert.rejects(within(c.sendMessage("channel_x", "never acked")), (e) => e.code === "timeout");
    assert.equal(c.pendingCount, 0);
  });

  test("token_expiring: with getToken the client refreshes the token on the open connection", { timeout: 10_000 }, async () => {
    const server = await fakeHub({
      onConnect: (socket) => socket.send(JSON.stringify({ type: "token_expiring", expires_at: new Date().toISOString(), in_s: 30 })),
      onFrame: (socket, frame) => {
        if (frame.type === "refresh") {
          socket.send(JSON.stringify({ type: "token_refreshed", expires_at: new Date().toISOString(), request_id: frame.request_id }));
        }
      },
    });
    let issued = 0;
    const c = client(server.url, { token: undefined, getToken: async () => `token-${++issued}` });
    const refreshed = nextEvent(c, "token_refreshed");
    await within(c.connect());
    await refreshed;
    const refresh = server.frames.find((f) => f.type === "refresh");
    assert.equal(refresh.token, "token-2", "a fresh token, not the one the connection opened with");
    assert.equal(server.connections, 1, "no reconnect needed");
  });

  test("a throwing handler is reported and does not stop other handlers", { timeout: 10_000 }, async () => {
    const server = await fakeHub();
    const reported = [];
    const c = client(server.url, { onHandlerError: (e) => reported.push(e) });
    c.on("connection_established", () => { throw new Error("app bug"); });
    const seen = nextEvent(c, "connection_established");
    await within(c.connect());
    await seen;
    assert.equal(reported.length, 1);
    assert.equal(c.state, "open");
  });

  test("close() rejects queued sends and leaves nothing running", { timeout: 10_000 }, async () => {
    const port = await freePort();
    const c = client(`ws://127.0.0.1:${port}/ws/connect`);
    c.connect();
    c.joinRoom("channel_q").catch(() => {});
    const pending = c.sendMessage("channel_q", "queued");
    assert.equal(c.pendingCount, 1);
    c.close();
    await assert.rejects(pending, (e) => e.code === "closed");
    assert.equal(c.state, "closed");
    assert.deepEqual(c.rooms, []);
  });

  test("URLs: token and client_type in the query; relative URLs resolve against the page", () => {
    const absolute = new HubClient({ url: "ws://127.0.0.1:8000/ws/connect", token: "t", WebSocket, deviceId: "d1" });
    assert.equal(absolute._connectUrl("a.b.c"), "ws://127.0.0.1:8000/ws/connect?token=a.b.c&client_type=web&device_id=d1");
    assert.equal(absolute._httpBase(), "http://127.0.0.1:8000");
    globalThis.location = { href: "https://app.example.com/chat/" }; // what a browser page has
    try {
      const relative = new HubClient({ url: "/ws/connect", token: "t", WebSocket });
      assert.equal(relative._connectUrl("x"), "wss://app.example.com/ws/connect?token=x&client_type=web");
      assert.equal(relative._httpBase(), "https://app.example.com");
    } finally {
      delete globalThis.location;
    }
  });

  test("messages over maxFrameBytes are refused before they are queued", async () => {
    const c = client("ws://127.0.0.1:1/ws/connect", { maxFrameBytes: 1_000 });
    await assert.rejects(c.sendMessage("channel_q", "é".repeat(600)), (e) => e.code === "message_too_large");
    assert.equal(c.pendingCount, 0);
  });
});
