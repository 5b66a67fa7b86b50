// Test helpers: a real hub process (`python3 -m cli.main serve`), HS256 tokens minted with node's crypto,
// bounded waits, a TCP proxy that can stop forwarding, and Redis cleanup. Every wait has a deadline.

import { spawn, spawnSync } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";

import WebSocket from "ws";

import { HubClient } from "../streamhub.js";

export { WebSocket };

/** The repository root (clients/js/test-support -> ../../..): where `python3 -m cli.main` runs. STREAMHUB_ROOT
 * points the tests at another checkout of the hub (e.g. a clean export while the tree is being edited). */
export const ROOT = process.env.STREAMHUB_ROOT
  || path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
export const SECRET = "test-secret-0123456789abcdef0123456789abcdef";
const REDIS_URL = process.env.TEST_REDIS_URL || "redis://127.0.0.1:6379/0";
// tests/test_js_client.py passes the interpreter pytest runs under, which has the hub installed.
const PYTHON = process.env.PYTHON || "python3";

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** `promise`'s value, or undefined after `ms`; the timer is cleared so it never holds the process open. */
function raceTimeout(promise, ms) {
  let timer;
  const timeout = new Promise((resolve) => { timer = setTimeout(resolve, ms); });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** A fresh Redis key prefix for one test file; keys under it are deleted by cleanupPrefix(). */
export function newPrefix() {
  return `js${randomBytes(4).toString("hex")}:`;
}

/** A channel room name no other test uses. */
export function newRoom(label = "r") {
  return `channel_${label}${randomBytes(4).toString("hex")}`;
}

/** An HS256 JWT with sub, iat, exp (and any extra claims), like a backend would mint. */
export function mintToken(sub, { ttlS = 3600, secret = SECRET, claims = {} } = {}) {
  const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  const now = Math.floor(Date.now() / 1000);
  const head = b64({ alg: "HS256", typ: "JWT" });
  const body = b64({ sub: String(sub), iat: now, exp: now + ttlS, ...claims });
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

/** A TCP port that was free a moment ago. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

const running = new Set();
// Last resort if a test file dies without its after() hook: never leave a hub behind.
process.on("exit", () => {
  for (const child of running) {
    try { child.kill("SIGKILL"); } catch { /* gone */ }
  }
});

/**
 * A hub node as a subprocess. start() resolves when it printed its "ready" line (deadline 30 s).
 * The same object restarts on the same port after stop().
 */
export class Hub {
  constructor({ prefix, port, env = {} }) {
    this.prefix = prefix;
    this.port = port;
    this.env = env;
    this.child = null;
    this.log = "";
  }

  get url() {
    return `ws://127.0.0.1:${this.port}/ws/connect`;
  }

  async start(timeoutMs = 30_000) {
    if (this.port === undefined || this.port === null) this.port = await freePort();
    const env = {
      ...process.env,
      JWT_SECRET: SECRET,
      REDIS_URL,
      HUB_REDIS_KEY_PREFIX: this.prefix,
      HUB_REDIS_EMBEDDED: "never",
      HUB_SERVER_API_PORT: "0",
      // Tests open many connections from 127.0.0.1 and send fast; the hub's limits have their own tests.
      WEBSOCKET_MAX_CONNECTIONS_PER_IP: "1000",
      WEBSOCKET_MESSAGE_RATE_LIMIT: "100000",
      HUB_SERVER_MESSAGE_BURST: "10000",
      HUB_SERVER_MAX_CONNECTIONS_PER_USER: "1000",
      HUB_SERVER_CONNECT_RATE_LIMIT_PER_MIN: "100000",
      HUB_SERVER_CONNECT_BURST: "10000",
      HUB_SERVER_TYPING_BURST: "10000",
      // A draining node waits this long for its clients; ours reconnect at once, so keep it short.
      HUB_SERVER_DRAIN_TIMEOUT_S: "2",
      HUB_LOGGING_LEVEL: "WARNING",
      ...this.env,
    };
    // Started through runpy (the same as `python3 -m cli.main serve ...`) after asking Linux to
    // SIGTERM the hub if this test process dies, so a crashed test run leaves no hub behind.
    const bootstrap = [
      "import ctypes, runpy, signal, sys",
      "try:\n    ctypes.CDLL(None).prctl(1, signal.SIGTERM)\nexcept Exception:\n    pass",
      "sys.argv = ['cli.main', 'serve', '--host', '127.0.0.1', '--port', sys.argv[1]]",
      "runpy.run_module('cli.main', run_name='__main__', alter_sys=True)",
    ].join("\n");
    const child = spawn(PYTHON, ["-c", bootstrap, String(this.port)], { cwd: ROOT, env, stdio: ["ignore", "pipe", "pipe"] });
    this.child = child;
    running.add(child);
    child.on("exit", () => running.delete(child));
    const collect = (chunk) => {
      this.log += chunk.toString();
      if (this.log.length > 200_000) this.log = this.log.slice(-100_000);
    };
    child.stderr.on("data", collect);
    await new Promise((resolve, reject) => {
      let stdout = "";
      const timer = setTimeout(() => done(new Error(`hub did not print "ready" within ${timeoutMs} ms:\n${this.log}`)), timeoutMs);
      const onData = (chunk) => {
        collect(chunk);
        stdout += chunk.toString();
        if (/ready/.test(stdout)) done();
      };
      const onExit = (code) => done(new Error(`hub exited with ${code} before "ready":\n${this.log}`));
      function done(error) {
        clearTimeout(timer);
        child.stdout.off("data", onData);
        child.off("exit", onExit);
        if (error) reject(error);
        else resolve();
      }
      child.stdout.on("data", onData);
      child.on("exit", onExit);
    });
    child.stdout.on("data", collect);
    return this;
  }

  /** Send `signal` and wait (bounded) for the process to exit; SIGKILL if it overstays. */
  async stop(signal = "SIGTERM", timeoutMs = 15_000) {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((resolve) => child.once("exit", () => resolve(true)));
    child.kill(signal);
    if (!(await raceTimeout(exited, timeoutMs))) {
      child.kill("SIGKILL");
      await raceTimeout(exited, 5_000);
    }
    this.child = null;
  }

  /** SIGSTOP / SIGCONT: the process keeps its sockets but answers nothing. */
  pause() { this.child?.kill("SIGSTOP"); }

  resume() { this.child?.kill("SIGCONT"); }
}

/** Delete every Redis key under `prefix` (the hub's keys for this test file). */
export function cleanupPrefix(prefix) {
  const scan = spawnSync("redis-cli", ["-u", REDIS_URL, "--scan", "--pattern", `${prefix}*`], { encoding: "utf8", timeout: 20_000 });
  const keys = (scan.stdout || "").split("\n").filter(Boolean);
  for (let i = 0; i < keys.length; i += 500) {
    spawnSync("redis-cli", ["-u", REDIS_URL, "del", ...keys.slice(i, i + 500)], { timeout: 20_000 });
  }
}

/** Run one redis-cli command against the test Redis; returns its stdout. */
export function redis(...args) {
  const result = spawnSync("redis-cli", ["-u", REDIS_URL, ...args], { encoding: "utf8", timeout: 20_000 });
  if (result.status !== 0) throw new Error(`redis-cli ${args.join(" ")} failed: ${result.stderr}`);
  return result.stdout.trim();
}

/** Poll `predicate` until it is truthy; throws after `timeoutMs` with `label`. */
export async function waitFor(predicate, { timeoutMs = 10_000, intervalMs = 10, label = "condition" } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() >= deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${label}`);
    await sleep(intervalMs);
  }
}

/** The next `type` event of `client` matching `filter`, within `timeoutMs`. */
export function nextEvent(client, type, filter = () => true, timeoutMs = 10_000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`timed out after ${timeoutMs} ms waiting for a ${type} event`));
    }, timeoutMs);
    const off = client.on(type, (payload) => {
      if (!filter(payload)) return;
      clearTimeout(timer);
      off();
      resolve(payload);
    });
  });
}

/** Resolve `promise` or fail after `timeoutMs` (so no test waits forever on a client promise). */
export function within(promise, timeoutMs = 10_000, label = "promise") {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${timeoutMs} ms waiting for ${label}`)), timeoutMs);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** A HubClient for Node with test-friendly defaults (fast backoff), plus a record of its events. */
export function makeClient(url, options = {}) {
  const client = new HubClient({
    url,
    WebSocket,
    clientType: "node-test",
    backoff: { initialMs: 50, maxMs: 400, factor: 2, jitter: 1 },
    ...options,
  });
  const events = { states: [], messages: [], gaps: [], authErrors: [], errors: [] };
  client.on("state", (e) => events.states.push(e));
  client.on("chat_message", (m) => events.messages.push(m));
  client.on("gap", (g) => events.gaps.push(g));
  client.on("auth_error", (e) => events.authErrors.push(e));
  client.on("error", (e) => events.errors.push(e));
  client.events = events;
  return client;
}

/** Messages of `room` a client received, by content. */
export function contents(client, room) {
  return client.events.messages.filter((m) => m.room === room).map((m) => m.content);
}

/**
 * A TCP proxy in front of the hub whose existing connections can be frozen: bytes stop flowing but
 * the sockets stay open, which is what a dead network path looks like (no FIN, no RST). Connections
 * opened after a freeze are forwarded normally, so a client that reconnects gets through.
 */
export class FreezingProxy {
  constructor(targetPort) {
    this.targetPort = targetPort;
    this.pairs = new Set();
    this.server = net.createServer((client) => this._accept(client));
  }

  listen() {
    return new Promise((resolve) => this.server.listen(0, "127.0.0.1", () => {
      this.port = this.server.address().port;
      resolve(this);
    }));
  }

  get url() {
    return `ws://127.0.0.1:${this.port}/ws/connect`;
  }

  _accept(client) {
    const upstream = net.connect(this.targetPort, "127.0.0.1");
    const pair = { client, upstream, up: true, down: true };
    this.pairs.add(pair);
    client.on("data", (data) => { if (pair.up) upstream.write(data); });
    upstream.on("data", (data) => { if (pair.down) client.write(data); });
    const end = () => {
      this.pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on("error", end);
    upstream.on("error", end);
    client.on("close", () => { if (pair.up && pair.down) end(); });
    upstream.on("close", () => { if (pair.up && pair.down) end(); });
  }

  /** Stop forwarding on every current connection: `down` server->client, `up` client->server. */
  freeze({ up = true, down = true } = {}) {
    for (const pair of this.pairs) {
      if (up) pair.up = false;
      if (down) pair.down = false;
    }
  }

  get connectionCount() {
    return this.pairs.size;
  }

  close() {
    for (const pair of this.pairs) {
      pair.client.destroy();
      pair.upstream.destroy();
    }
    this.pairs.clear();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}
