// Reconnect and resume against real hub processes: node 1 is stopped (SIGTERM: close 4001) or killed
// (SIGKILL: no close frame) while a second node keeps the room going; the client comes back to node 1 on
// the same port, resumes with no gap and no duplicate, and delivers what it queued while offline once.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import {
  Hub, cleanupPrefix, contents, freePort, makeClient, mintToken, newPrefix, newRoom, nextEvent, redis, waitFor, within,
} from "../test-support/helpers.mjs";

const prefix = newPrefix();
let node1; // the node the client under test uses; restarted by the tests
let node2; // another node of the same hub (same Redis and prefix): the room lives on while node1 is down
const clients = [];

before(async () => {
  node1 = new Hub({ prefix, port: await freePort() });
  node2 = new Hub({ prefix });
  await Promise.all([node1.start(), node2.start()]);
});

after(async () => {
  for (const client of clients) client.close();
  await Promise.all([node1.stop("SIGTERM"), node2.stop("SIGTERM")]);
  cleanupPrefix(prefix);
});

async function connected(hub, user) {
  const client = makeClient(hub.url, { token: mintToken(user) });
  clients.push(client);
  await within(client.connect(), 10_000, `client ${user} to connect`);
  return client;
}

for (const signal of ["SIGTERM", "SIGKILL"]) {
  test(`node ${signal === "SIGTERM" ? "stopped (4001)" : "killed"}: resume with no gap and no duplicate, offline sends delivered once`,
    { timeout: 60_000 }, async () => {
      const room = newRoom(signal.toLowerCase());
      const a = await connected(node1, "101"); // the client under test, on node 1
      const b = await connected(node2, "102"); // another member, on node 2
      await within(a.joinRoom(room));
      await within(b.joinRoom(room));
      await within(b.sendMessage(room, "before"));
      await waitFor(() => contents(a, room).includes("before"), { label: "before" });

      const lost = nextEvent(a, "state", (s) => s.state === "reconnecting", 20_000);
      await node1.stop(signal);
      const first = await lost;
      assert.equal(first.code, signal === "SIGTERM" ? 4001 : 1006);
      assert.equal(first.attempt, 1);

      // While a is away: b keeps talking (through node 2) and a sends into its queue.
      for (const text of ["while-1", "while-2", "while-3"]) await within(b.sendMessage(room, text));
      const queued = [a.sendMessage(room, "queued-1"), a.sendMessage(room, "queued-2")];
      assert.equal(a.pendingCount, 2);
      // a keeps trying (the port refuses), each attempt counted and announced.
      await waitFor(() => a.events.states.filter((s) => s.state === "reconnecting").length >= 3, { label: "3 attempts" });

      const rejoined = nextEvent(a, "room_joined", (f) => f.room === room, 30_000);
      await node1.start();
      const joined = await rejoined;
      assert.equal(joined.recovered, true, "resumed from {epoch, last_id}");
      assert.deepEqual(joined.messages.map((m) => m.content), ["while-1", "while-2", "while-3"]);

      const acks = await within(Promise.all(queued), 10_000, "acks of the queued messages");
      assert.ok(acks.every((ack) => ack.duplicate === undefined), "first delivery, not a retry");
      await within(b.sendMessage(room, "after"));
      await waitFor(() => contents(a, room).includes("after") && contents(b, room).includes("after"), { label: "after" });

      const expected = ["before", "while-1", "while-2", "while-3", "queued-1", "queued-2", "after"];
      assert.deepEqual(contents(a, room), expected, "a: every message once, in order");
      assert.deepEqual(contents(b, room), expected, "b: every message once, in order");
      assert.equal(a.events.gaps.length, 0);
      const ids = a.events.messages.filter((m) => m.room === room).map((m) => m.id);
      assert.deepEqual(acks.map((ack) => ack.id), ids.slice(4, 6), "the acks name the ids the room delivered");

      // The reconnect attempts: numbered 1, 2, 3, ... and each delay within its backoff ceiling.
      const attempts = a.events.states.filter((s) => s.state === "reconnecting");
      attempts.forEach((s, i) => {
        assert.equal(s.attempt, i + 1);
        assert.ok(s.delayMs >= 0 && s.delayMs <= Math.min(400, 50 * 2 ** i), `attempt ${s.attempt}: ${s.delayMs} ms`);
      });
      assert.equal(a.events.states.at(-1).state, "open");
    });
}

test("a room whose data Redis lost resumes with recovered: false and a gap event", { timeout: 60_000 }, async () => {
  const room = newRoom("gap");
  const a = await connected(node1, "111");
  await within(a.joinRoom(room));
  await within(a.sendMessage(room, "old"));
  await waitFor(() => contents(a, room).includes("old"), { label: "old" }); // the echo, which may follow the ack
  const before = a.getRoom(room);

  const lost = nextEvent(a, "state", (s) => s.state === "reconnecting", 20_000);
  await node1.stop("SIGTERM");
  await lost;
  // What a Redis restart without persistence does to the room: stream and epoch gone.
  const keys = redis("--scan", "--pattern", `${prefix}{${room}}*`).split("\n").filter(Boolean);
  assert.ok(keys.length > 0);
  redis("del", ...keys);

  const gap = nextEvent(a, "gap", (g) => g.room === room, 30_000);
  await node1.start();
  const event = await gap;
  assert.equal(event.previousEpoch, before.epoch);
  assert.equal(event.previousLastId, before.lastId);
  assert.notEqual(event.epoch, before.epoch, "Redis lost the room: a new epoch");
  assert.equal(a.getRoom(room).epoch, event.epoch, "the client tracks the new epoch");

  // The room works on: a new message arrives (not mistaken for a duplicate of the old ids).
  await within(a.sendMessage(room, "new"));
  await waitFor(() => contents(a, room).includes("new"), { label: "new" });
  assert.deepEqual(contents(a, room), ["old", "new"]);
});
