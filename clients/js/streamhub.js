/**
 * streamhub JavaScript client: one ES module, no build step, no dependencies.
 *
 * Works in browsers (global WebSocket) and in Node (pass a WebSocket implementation such as the `ws`
 * package as `options.WebSocket`). The wire protocol is the one in the hub's README ("Protocol").
 *
 * What this client does for the application, and why:
 *  - Reconnects after every unplanned close, with exponential backoff and full jitter (so a node restart
 *    does not bring every client back in the same millisecond), and never gives up silently: each
 *    attempt is a `state` event with its number, `maxAttempts` defaults to Infinity, and the only other
 *    stops are an explicit close() and credentials the hub refuses (`auth_error`).
 *  - Tracks `{epoch, last_id}` per joined room and resumes every room after a reconnect; when the hub
 *    cannot replay the gap (`recovered: false`) it emits `gap` so the application refetches history.
 *  - Drops frames whose id is not newer than the room's last id (ids increase within a room), so a
 *    replay overlapping what was already delivered never shows a message twice.
 *  - Queues messages while disconnected, each with its client_msg_id, and sends them once their room
 *    is joined again. A message whose ack was lost is re-sent with the same client_msg_id, which the
 *    hub de-duplicates (`ack.duplicate: true`), so a retry never stores a message twice.
 *  - Acks are promises (resolved by the matching `ack`, rejected by the matching `error` or a timeout).
 *  - Detects dead connections (a TCP connection can stay "open" for minutes after the network went
 *    away): it pings every heartbeat interval and reconnects when nothing arrived for two intervals.
 */

/** Default reconnect backoff: 0.5 s doubling to 30 s, full jitter. */
export const DEFAULT_BACKOFF = Object.freeze({
  initialMs: 500,
  maxMs: 30_000,
  factor: 2,
  // Fraction of each delay that is randomised: 1 = full jitter (uniform in [0, ceiling]), 0.5 = "equal
  // jitter", 0 = none. Full jitter spreads a crowd of reconnecting clients best.
  jitter: 1,
  // A connection that stayed up this long resets the attempt count. A shorter one (a server accepting
  // then closing at once) keeps growing the delay, so a flapping server never causes a reconnect storm.
  resetAfterMs: 5_000,
});

const DEFAULTS = Object.freeze({
  heartbeatMs: null, // null: the server's heartbeat_s from connection_established
  maxAttempts: Infinity,
  connectTimeoutMs: 10_000, // socket open + connection_established
  ackTimeoutMs: 15_000, // from writing a chat_message to its ack, on a live connection
  requestTimeoutMs: 15_000, // from writing join/leave/subscribe/mark_read/... to the reply
  sendRetries: 5, // automatic retries of a send refused with retryable: true (rate_limited, unavailable)
  maxQueue: 1000, // unacknowledged messages held at once
  maxFrameBytes: 1_048_576, // the hub's server.max_frame_bytes: a larger frame would close the socket (1009)
  clientType: "web",
});

/** Frame types that carry a room's stream id (`id`): what resume and de-duplication track. */
export const ROOM_FRAME_TYPES = Object.freeze([
  "chat_message", "order_status_update", "quote_update", "payment_update", "system_notification",
  "deadline_reminder",
]);
const ROOM_FRAMES = new Set(ROOM_FRAME_TYPES);

const CLIENT_MSG_ID = /^[A-Za-z0-9_.:-]{1,64}$/;
const WS_OPEN = 1; // WebSocket.OPEN; some implementations expose it on the class only

/** An error the hub sent (`code` from its error table) or one this client raised (`timeout`,
 * `closed`, `queue_full`, `left`, `unauthorized`, `invalid_message`). */
export class HubError extends Error {
  constructor(code, message, { frame = null, retryable = false, retryAfterMs = null, clientMsgId = null } = {}) {
    super(message || code);
    this.name = "HubError";
    this.code = code;
    this.frame = frame;
    this.retryable = retryable;
    this.retryAfterMs = retryAfterMs;
    this.clientMsgId = clientMsgId;
  }

  static fromFrame(frame) {
    return new HubError(frame.code || "error", frame.message, {
      frame, retryable: frame.retryable === true,
      retryAfterMs: typeof frame.retry_after_ms === "number" ? frame.retry_after_ms : null,
      clientMsgId: frame.client_msg_id ?? null,
    });
  }
}

/**
 * Delay before reconnect attempt `attempt` (1, 2, ...): exponential ceiling
 * `min(maxMs, initialMs * factor^(attempt-1))`, of which the `jitter` fraction is random
 * ("full jitter" when jitter is 1: uniform in [0, ceiling]). `random` is injectable for tests.
 */
export function backoffDelay(attempt, options = {}, random = Math.random) {
  const o = { ...DEFAULT_BACKOFF, ...options };
  let jitter = o.jitter === true ? 1 : o.jitter === false ? 0 : Number(o.jitter);
  if (!Number.isFinite(jitter)) jitter = 1;
  jitter = Math.min(1, Math.max(0, jitter));
  const n = Math.max(1, Math.floor(attempt));
  // factor^(n-1) overflows to Infinity for huge n; Math.min then yields maxMs, which is what we want.
  const ceiling = Math.max(0, Math.min(o.maxMs, o.initialMs * Math.pow(o.factor, n - 1)));
  return Math.round(ceiling - jitter * ceiling * random());
}

/** Compare two stream ids ("1732550400000-0"): negative, 0 or positive. Exact for any length (the
 * hub's ids are canonical decimals: no leading zeros), so no float rounding near 2^53. */
export function compareIds(a, b) {
  const [am, as = "0"] = String(a).split("-");
  const [bm, bs = "0"] = String(b).split("-");
  return compareDecimal(am, bm) || compareDecimal(as, bs);
}

function compareDecimal(x, y) {
  if (x.length !== y.length) return x.length - y.length;
  return x < y ? -1 : x > y ? 1 : 0;
}

/** A client_msg_id: unique, within the hub's 1-64 of [A-Za-z0-9_.:-]. */
export function newClientMsgId() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === "function") return `c-${c.randomUUID()}`;
  const bytes = new Uint8Array(16);
  if (c && typeof c.getRandomValues === "function") c.getRandomValues(bytes);
  else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  return `c-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

/** UTF-8 length of a string without allocating (the hub's limits are in bytes). */
function utf8Length(text) {
  let n = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c < 0x80) n += 1;
    else if (c < 0x800) n += 2;
    else if (c >= 0xd800 && c <= 0xdbff && i + 1 < text.length) { n += 4; i++; } // surrogate pair
    else n += 3;
  }
  return n;
}

/** The `exp` claim of a JWT in ms, or null. Only used to tell "token expired" from "network down"
 * when a handshake fails before opening: browsers hide the hub's HTTP 401 behind a bare close 1006. */
function tokenExpiryMs(token) {
  try {
    const part = String(token).split(".")[1];
    if (!part) return null;
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "=");
    const claims = JSON.parse(globalThis.atob(b64));
    return typeof claims.exp === "number" ? claims.exp * 1000 : null;
  } catch {
    return null;
  }
}

/** `promise`'s outcome, or a rejection after `ms` (the timer is cleared either way). */
function withTimeout(promise, ms, message) {
  let timer;
  const timeout = new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(message)), ms); });
  return Promise.race([Promise.resolve(promise), timeout]).finally(() => clearTimeout(timer));
}

function defaultReport(error) {
  if (typeof globalThis.reportError === "function") globalThis.reportError(error);
  else console.error("streamhub: an event handler threw", error); // eslint-disable-line no-console
}

/** A promise with its settle functions, and a no-op catch attached: an application that fires a send
 * and forgets it must not crash Node with an unhandled rejection (errors are also emitted as events). */
function deferred() {
  let resolve, reject;
  const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
  promise.catch(() => {});
  return { promise, resolve, reject };
}

/**
 * The client. Events (`on(type, handler)`): every server frame type (`chat_message`, `room_joined`,
 * `ack`, `error`, `typing_indicator`, `presence_update`, `order_status_update`, ...), `"*"` for every
 * server frame, and the client's own: `state`, `gap`, `auth_error`, `connection_error`.
 */
export class HubClient {
  constructor(options = {}) {
    if (!options.url) throw new TypeError("HubClient: options.url is required (ws://host:port/ws/connect)");
    if (!options.token && typeof options.getToken !== "function") {
      throw new TypeError("HubClient: give options.token or options.getToken");
    }
    const WebSocketImpl = options.WebSocket ?? globalThis.WebSocket;
    if (typeof WebSocketImpl !== "function") {
      throw new TypeError("HubClient: no WebSocket implementation; in Node pass { WebSocket } (e.g. from 'ws')");
    }
    this._url = options.url;
    this._httpUrl = options.httpUrl ?? null;
    this._token = options.token ?? null;
    this._getToken = typeof options.getToken === "function" ? options.getToken : null;
    this._WebSocket = WebSocketImpl;
    this._fetch = options.fetch ?? globalThis.fetch;
    this._opts = { ...DEFAULTS, ...options, backoff: { ...DEFAULT_BACKOFF, ...(options.backoff || {}) } };
    this._random = options.random ?? Math.random;
    this._report = options.onHandlerError ?? defaultReport;

    this._handlers = new Map(); // event type -> Set of handlers
    this._state = "closed";
    this._stopped = true; // no reconnects unless connect() was called and close() was not
    this._generation = 0; // bumped by connect()/close(): stale async steps of an old attempt stop
    this._ws = null;
    this._established = false; // connection_established received on this._ws
    this._establishedAt = 0;
    this._lastFrameAt = 0;
    this._failures = 0; // consecutive failed (or short-lived) connections: the backoff attempt
    this._httpStatus = null; // the HTTP status of a refused handshake, when the implementation tells
    this._lastToken = null;
    this._clockOffsetMs = 0; // server time - local time, from connection_established
    this._heartbeatMs = 0;
    this._timers = { reconnect: null, connect: null, ping: null, watchdog: null };
    this._open = null; // deferred of connect()

    this._nextRequestId = 1;
    this._replies = new Map(); // request_id on the current connection -> what it was for
    this._rooms = new Map(); // room -> RoomState (rooms the application wants joined)
    this._subs = new Map(); // "order:12" -> {kind, id} (update subscriptions, renewed after reconnects)
    this._sends = new Map(); // client_msg_id -> SendEntry, in send order (Map keeps insertion order)
    this._requests = new Set(); // pending mark_read/presence/subscribe/... requests
    this._presence = "online";

    this.connectionId = null;
    this.userId = null;
    this.stats = { connects: 0, duplicatesDropped: 0 };
  }

  // ------------------------------------------------------------------ events

  /** Subscribe to an event; returns a function that unsubscribes. */
  on(type, handler) {
    let set = this._handlers.get(type);
    if (!set) this._handlers.set(type, (set = new Set()));
    set.add(handler);
    return () => this.off(type, handler);
  }

  off(type, handler) {
    const set = this._handlers.get(type);
    if (set) set.delete(handler);
  }

  _emit(type, payload) {
    const set = this._handlers.get(type);
    if (!set || set.size === 0) return;
    for (const handler of [...set]) { // a copy: handlers may unsubscribe while we iterate
      try {
        handler(payload);
      } catch (error) {
        this._report(error); // one faulty handler must not break the client's own bookkeeping
      }
    }
  }

  _emitFrame(frame) {
    this._emit(frame.type, frame);
    this._emit("*", frame);
  }

  // ------------------------------------------------------------------ state

  /** "connecting" | "open" | "reconnecting" | "closed" */
  get state() {
    return this._state;
  }

  /** Messages sent but not yet acknowledged (queued or in flight). */
  get pendingCount() {
    return this._sends.size;
  }

  /** A snapshot of a joined room's resume position: {room, epoch, lastId, live}, or null. */
  getRoom(room) {
    const st = this._rooms.get(room);
    return st ? { room, epoch: st.epoch, lastId: st.lastId, live: st.live } : null;
  }

  /** The rooms the client keeps joined (and resumes after reconnects). */
  get rooms() {
    return [...this._rooms.keys()];
  }

  _setState(state, detail = {}) {
    const previous = this._state;
    this._state = state;
    this._emit("state", { state, previous, ...detail });
  }

  /** Replace the static token (used from the next connection attempt on). */
  setToken(token) {
    this._token = token;
  }

  // ------------------------------------------------------------------ connect / close

  /**
   * Start connecting (and keep reconnecting). Resolves once the first connection is established;
   * rejects only if the client stops first (close(), an auth error with a static token, maxAttempts).
   * Calling it while connecting or open returns the same promise.
   */
  connect() {
    if (!this._stopped && this._open) return this._open.promise;
    this._stopped = false;
    this._failures = 0;
    this._open = deferred();
    const open = this._open;
    this._setState("connecting", { attempt: 0 });
    this._attempt();
    return open.promise;
  }

  /** Close for good: no reconnect; every pending send and request is rejected with code "closed" and
   * the room list is cleared. connect() may be called again afterwards (a fresh start). */
  close(code = 1000, reason = "client closed") {
    const wasStopped = this._stopped;
    this._stopped = true;
    this._generation++;
    const ws = this._ws;
    this._dropConnection();
    if (ws) {
      try { ws.close(code, reason); } catch { /* already closing */ }
    }
    const error = new HubError("closed", "the client was closed");
    for (const entry of this._sends.values()) this._settleSend(entry, error);
    for (const entry of [...this._requests]) this._settleRequest(entry, error);
    for (const st of this._rooms.values()) this._rejectJoin(st, error);
    this._rooms.clear();
    this._subs.clear();
    this._presence = "online";
    if (this._open) this._open.reject(error);
    this._open = null;
    if (!wasStopped || this._state !== "closed") this._setState("closed", { reason: "client" });
  }

  /** Stop reconnecting but keep rooms and queued messages, so connect() (after setToken) resumes. */
  _halt(reason, detail = {}) {
    this._stopped = true;
    this._generation++;
    const error = new HubError(reason === "auth_error" ? "unauthorized" : reason, `client stopped: ${reason}`);
    if (this._open) this._open.reject(error);
    this._open = null;
    this._setState("closed", { reason, ...detail });
  }

  async _attempt() {
    this._timers.reconnect = null;
    const generation = ++this._generation;
    this._lastToken = null; // judged for expiry only once it was actually used for a handshake
    let token;
    try {
      // Bounded: a getToken that never settles must not leave the client silently stuck.
      token = this._getToken ? await withTimeout(this._getToken(), this._opts.connectTimeoutMs, "getToken timed out") : this._token;
      if (!token) throw new Error("no token");
    } catch (error) {
      if (generation !== this._generation || this._stopped) return;
      this._emit("connection_error", { stage: "token", error });
      this._lost({ code: null, reason: "no token" });
      return;
    }
    if (generation !== this._generation || this._stopped) return; // close() or connect() meanwhile
    this._lastToken = token;
    this._httpStatus = null;
    let ws;
    try {
      ws = new this._WebSocket(this._connectUrl(token));
    } catch (error) {
      this._emit("connection_error", { stage: "socket", error });
      this._lost({ code: null, reason: "socket could not be created" });
      return;
    }
    this._ws = ws;
    this.stats.connects++;
    // Listeners stay attached for the socket's whole life and ignore it once it is no longer current:
    // detaching them would make the `ws` package throw on a late 'error' with no listener.
    ws.onmessage = (event) => { if (ws === this._ws) this._onMessage(event.data); };
    ws.onerror = (event) => {
      if (ws !== this._ws) return;
      // Node's `ws` reports a refused handshake as "Unexpected server response: 401"; browsers do not.
      const text = String(event?.message ?? event?.error?.message ?? "");
      const status = /Unexpected server response: (\d{3})/.exec(text);
      if (status) this._httpStatus = Number(status[1]);
      this._emit("connection_error", { stage: "socket", error: event?.error ?? event, status: this._httpStatus });
    };
    ws.onclose = (event) => {
      if (ws === this._ws) this._lost({ code: event?.code ?? null, reason: event?.reason || "" });
    };
    this._timers.connect = setTimeout(() => {
      if (ws === this._ws && !this._established) this._abandon("connect timeout");
    }, this._opts.connectTimeoutMs);
  }

  /** The WebSocket URL as a URL object. A relative URL ("/ws/connect", in a page served by the hub or
   * behind its proxy) is resolved against the page, http(s) becoming ws(s). */
  _wsUrl() {
    const url = new URL(this._url, globalThis.location?.href);
    if (url.protocol === "http:") url.protocol = "ws:";
    else if (url.protocol === "https:") url.protocol = "wss:";
    return url;
  }

  _connectUrl(token) {
    const url = this._wsUrl();
    url.searchParams.set("token", token);
    if (this._opts.clientType) url.searchParams.set("client_type", this._opts.clientType);
    if (this._opts.clientVersion) url.searchParams.set("client_version", this._opts.clientVersion);
    if (this._opts.deviceId) url.searchParams.set("device_id", this._opts.deviceId);
    return url.toString();
  }

  /** Give up on the current socket without waiting for a close handshake (a dead TCP connection
   * would make close() wait for minutes) and reconnect. */
  _abandon(reason) {
    const ws = this._ws;
    this._lost({ code: null, reason });
    if (!ws) return;
    try {
      if (typeof ws.terminate === "function") ws.terminate(); // `ws`: destroy the TCP socket now
      else ws.close(4000, reason);
    } catch { /* already closed */ }
  }

  /** Forget the current socket and everything in flight on it (the next connection re-sends). */
  _dropConnection() {
    for (const name of Object.keys(this._timers)) {
      clearTimeout(this._timers[name]);
      clearInterval(this._timers[name]);
      this._timers[name] = null;
    }
    this._ws = null;
    this._established = false;
    this._replies.clear();
    for (const st of this._rooms.values()) {
      st.live = false;
      st.joinWritten = false;
      clearTimeout(st.joinTimer);
      st.joinTimer = null;
      st.seenWhileJoining = null;
    }
    for (const entry of this._sends.values()) {
      clearTimeout(entry.ackTimer);
      entry.ackTimer = null;
      entry.requestId = null; // not acked: sent again, same client_msg_id, on the next connection
    }
    for (const entry of [...this._requests]) {
      clearTimeout(entry.timer);
      entry.timer = null;
      entry.requestId = null;
      if (entry.onLost) entry.onLost(entry);
    }
  }

  /** The connection is gone (closed, refused, timed out): decide between auth_error, giving up and
   * the next attempt with backoff. */
  _lost({ code, reason }) {
    const wasEstablished = this._established;
    const livedMs = wasEstablished ? Date.now() - this._establishedAt : 0;
    const status = this._httpStatus;
    this._dropConnection();
    if (this._stopped) return;

    const expiry = this._lastToken ? tokenExpiryMs(this._lastToken) : null;
    const expired = !wasEstablished && expiry !== null && expiry <= Date.now() + this._clockOffsetMs;
    const authProblem = (code >= 4500 && code <= 4999) || status === 401 || expired;

    if (livedMs >= this._opts.backoff.resetAfterMs) this._failures = 0;
    this._failures++;
    if (authProblem) {
      this._emit("auth_error", { code, reason, status, expired, attempt: this._failures });
      if (!this._getToken) { // the same token would be refused again: wait for setToken() + connect()
        this._halt("auth_error", { code, status });
        return;
      }
      // With getToken the next attempt asks for a fresh token, after the backoff delay like any other.
    }
    if (this._failures > this._opts.maxAttempts) {
      this._halt("max_attempts", { attempt: this._failures - 1, code });
      return;
    }
    const delayMs = backoffDelay(this._failures, this._opts.backoff, this._random);
    this._setState("reconnecting", { attempt: this._failures, delayMs, code, reason, status });
    this._timers.reconnect = setTimeout(() => this._attempt(), delayMs);
  }

  // ------------------------------------------------------------------ incoming frames

  _onMessage(data) {
    this._lastFrameAt = Date.now();
    let frame;
    try {
      frame = JSON.parse(typeof data === "string" ? data : String(data));
    } catch {
      return; // the hub sends JSON text frames only
    }
    if (!frame || typeof frame.type !== "string") return;
    switch (frame.type) {
      case "connection_established": return this._onEstablished(frame);
      case "room_joined": return this._onRoomJoined(frame);
      case "ack": return this._onAck(frame);
      case "error": return this._onError(frame);
      case "room_left": return this._onRoomLeft(frame);
      case "token_expiring":
        this._emitFrame(frame);
        return this._autoRefresh();
      default:
        if (ROOM_FRAMES.has(frame.type)) return this._onRoomFrame(frame);
        this._resolveReply(frame);
        this._emitFrame(frame);
    }
  }

  _onEstablished(frame) {
    clearTimeout(this._timers.connect);
    this._timers.connect = null;
    this._established = true;
    this._establishedAt = Date.now();
    const serverTime = Date.parse(frame.server_time);
    if (Number.isFinite(serverTime)) this._clockOffsetMs = serverTime - Date.now();
    this.connectionId = frame.connection_id ?? null;
    this.userId = frame.user_id ?? null;
    this._startHeartbeat(frame.heartbeat_s);
    const attempt = this._failures;
    this._setState("open", { attempt, connectionId: this.connectionId });
    if (this._open) this._open.resolve(frame);
    this._emitFrame(frame);
    if (this._ws === null) return; // a handler closed the client

    // Resume. Presence first, so the rooms' members never see an "away" user flash online; then
    // every room (with since when we have a position), every subscription, the pending requests and
    // the messages that do not wait for a room. Messages for a room wait for its room_joined.
    const presenceRequests = [...this._requests].filter((r) => r.frame.type === "presence");
    for (const entry of presenceRequests) this._writeRequest(entry);
    if (this._presence !== "online" && presenceRequests.length === 0) this._write({ type: "presence", status: this._presence });
    for (const st of this._rooms.values()) if (!st.joinWritten) this._writeJoin(st); // (a handler may have)
    for (const [key, sub] of this._subs) this._writeSubscribe(key, sub);
    for (const entry of this._requests) this._writeRequest(entry);
    for (const entry of this._sends.values()) if (!this._rooms.has(entry.room)) this._writeSend(entry);
  }

  _startHeartbeat(serverHeartbeatS) {
    const fromServer = typeof serverHeartbeatS === "number" && serverHeartbeatS > 0 ? serverHeartbeatS * 1000 : 20_000;
    this._heartbeatMs = this._opts.heartbeatMs > 0 ? this._opts.heartbeatMs : fromServer;
    // An application ping, not only a transport one: browsers cannot send WebSocket pings, and the
    // hub's idle timeout counts client frames.
    this._timers.ping = setInterval(() => this._write({ type: "ping" }), this._heartbeatMs);
    this._armWatchdog();
  }

  /** Fires when no frame arrived for two heartbeat intervals; re-arms itself while frames arrive (a
   * timer per frame would cost more than one check per interval). */
  _armWatchdog() {
    const deadline = this._lastFrameAt + 2 * this._heartbeatMs;
    this._timers.watchdog = setTimeout(() => {
      this._timers.watchdog = null;
      if (!this._established) return;
      if (Date.now() >= this._lastFrameAt + 2 * this._heartbeatMs) this._abandon("heartbeat timeout");
      else this._armWatchdog();
    }, Math.max(1, deadline - Date.now()));
  }

  _resolveReply(frame) {
    if (frame.request_id === undefined) return null;
    const target = this._replies.get(frame.request_id);
    if (!target) return null;
    this._replies.delete(frame.request_id);
    if (target.kind === "request") this._settleRequest(target.entry, null, frame);
    return target;
  }

  // ------------------------------------------------------------------ rooms

  /**
   * Join a room and keep it joined across reconnects. Resolves with the room_joined frame (its
   * `messages` are also emitted one by one as their own events). Options: `history` (newest N
   * messages on the first join). For a room already joined it resolves at once with the latest
   * room_joined; while a join is in flight, with that join's reply.
   */
  joinRoom(room, { history = 0 } = {}) {
    let st = this._rooms.get(room);
    if (st && st.live) return Promise.resolve(st.joinedFrame); // already joined on this connection
    if (!st) {
      st = {
        room, epoch: null, lastId: null, history, live: false, joinWritten: false, sentSince: false,
        joinTimer: null, waiters: [], seenWhileJoining: null, joinedFrame: null, joinRequestId: null,
      };
      this._rooms.set(room, st);
    }
    const waiter = deferred();
    st.waiters.push(waiter);
    // A join already in flight answers this call too.
    if (this._established && !st.joinWritten) this._writeJoin(st);
    return waiter.promise;
  }

  _writeJoin(st) {
    const requestId = this._requestId();
    const frame = { type: "join_room", room: st.room, request_id: requestId };
    st.sentSince = Boolean(st.epoch && st.lastId);
    if (st.sentSince) frame.since = { epoch: st.epoch, last_id: st.lastId };
    else if (st.history > 0) frame.history = st.history;
    this._replies.set(requestId, { kind: "join", room: st.room });
    st.joinWritten = true;
    st.joinRequestId = requestId;
    st.seenWhileJoining = st.live ? null : new Set();
    clearTimeout(st.joinTimer);
    st.joinTimer = setTimeout(() => {
      // The hub answers joins in milliseconds; silence on a live connection means it cannot serve the
      // room. Tell the application and stop keeping the room (a late room_joined is then ignored).
      st.joinTimer = null;
      if (this._rooms.get(st.room) !== st || st.live) return;
      this._forgetRoom(st, new HubError("timeout", `no reply to join_room ${st.room}`));
      this._write({ type: "leave_room", room: st.room });
    }, this._opts.requestTimeoutMs);
    this._write(frame);
  }

  _onRoomJoined(frame) {
    if (frame.request_id !== undefined) this._replies.delete(frame.request_id);
    const st = this._rooms.get(frame.room);
    // Not ours: the room was left (or its join timed out) while the join was in flight, or this answers
    // an older join of a room left and joined again (join, leave, join: the hub answers all three).
    if (!st || (frame.request_id !== undefined && frame.request_id !== st.joinRequestId)) {
      this._emitFrame(frame);
      return;
    }
    clearTimeout(st.joinTimer);
    st.joinTimer = null;
    const previous = { epoch: st.epoch, lastId: st.lastId };
    // Keep the old position as the de-duplication baseline only when the hub replayed exactly what
    // followed it; otherwise this is a fresh view of the room (first join, history, or a gap).
    const continuous = st.sentSince && frame.recovered === true && frame.epoch === st.epoch;
    if (!continuous) st.lastId = null;
    st.epoch = frame.epoch;
    st.live = true;
    st.history = 0;
    st.joinedFrame = frame;
    const seenWhileJoining = st.seenWhileJoining;
    st.seenWhileJoining = null;

    this._emitFrame(frame);
    if (st.sentSince && frame.recovered === false) {
      this._emit("gap", {
        room: st.room, epoch: frame.epoch, lastId: frame.last_id,
        previousEpoch: previous.epoch, previousLastId: previous.lastId,
      });
    }
    for (const message of Array.isArray(frame.messages) ? frame.messages : []) {
      if (seenWhileJoining && seenWhileJoining.has(message.id)) continue; // arrived live (subscription)
      this._onRoomFrame(message);
    }
    if (typeof frame.last_id === "string" && (!st.lastId || compareIds(frame.last_id, st.lastId) > 0)) {
      st.lastId = frame.last_id;
    }
    const waiters = st.waiters;
    st.waiters = [];
    for (const waiter of waiters) waiter.resolve(frame);
    // Messages queued for this room go out now, in the order they were sent.
    for (const entry of this._sends.values()) if (entry.room === st.room) this._writeSend(entry);
  }

  /** A chat message or backend event of a room: advance the room's position, drop repeats. */
  _onRoomFrame(frame) {
    const st = this._rooms.get(frame.room);
    if (st && typeof frame.id === "string") {
      if (!st.live) {
        // Before room_joined on this connection only update-subscription events can arrive; they are
        // new, but the join's replay may repeat them, so remember them and keep the position as is
        // (moving it here could skip chat messages the replay has not delivered yet).
        if (st.seenWhileJoining) st.seenWhileJoining.add(frame.id);
      } else if (st.lastId && compareIds(frame.id, st.lastId) <= 0) {
        this.stats.duplicatesDropped++;
        return;
      } else {
        st.lastId = frame.id;
      }
    }
    this._emitFrame(frame);
  }

  /**
   * Leave a room: it is no longer resumed, and its queued messages are rejected (code "left").
   * Resolves with the room_left frame (a local one when not connected: there is nothing to leave).
   */
  leaveRoom(room) {
    const st = this._rooms.get(room);
    const local = { type: "room_left", room, reason: "left" };
    if (!st) return Promise.resolve(local);
    const written = this._established && st.joinWritten;
    this._forgetRoom(st, new HubError("left", `left ${room}`));
    if (!written) return Promise.resolve(local);
    // The hub handles a connection's frames in order, so this leave follows the join even if the
    // room_joined reply has not arrived yet.
    return this._request({ type: "leave_room", room }, { onLost: (entry) => this._settleRequest(entry, null, local) });
  }

  _forgetRoom(st, error) {
    this._rooms.delete(st.room);
    clearTimeout(st.joinTimer);
    this._rejectJoin(st, error);
    for (const entry of this._sends.values()) {
      if (entry.room === st.room && entry.requestId === null) {
        this._settleSend(entry, new HubError(error.code, `${error.message}: message not sent`, { clientMsgId: entry.cmid }));
      }
    }
  }

  _rejectJoin(st, error) {
    const waiters = st.waiters;
    st.waiters = [];
    for (const waiter of waiters) waiter.reject(error);
  }

  _onRoomLeft(frame) {
    this._resolveReply(frame);
    const st = this._rooms.get(frame.room);
    if (st && frame.reason === "access_revoked") this._forgetRoom(st, new HubError("access_revoked", `removed from ${frame.room}`));
    this._emitFrame(frame);
  }

  // ------------------------------------------------------------------ messages

  /**
   * Send a chat message. Resolves with the ack frame (`{id, room, client_msg_id, duplicate?}`) once the
   * hub stored it; rejects with a HubError on an error reply, after `ackTimeoutMs` without an ack on a
   * live connection, or on close(). Offline, the message waits in the queue (no timeout runs).
   * Options: `messageType`, `metadata`, `clientMsgId` (generated when absent; reuse it to retry safely).
   */
  sendMessage(room, content, { messageType, metadata, clientMsgId } = {}) {
    const cmid = clientMsgId ?? newClientMsgId();
    const existing = this._sends.get(cmid);
    if (existing) return existing.promise; // the same message again: one send, one promise
    const fail = (code, message) => {
      const error = new HubError(code, message, { clientMsgId: cmid });
      const p = Promise.reject(error);
      p.catch(() => {});
      return p;
    };
    if (typeof room !== "string" || !room) return fail("invalid_room", "room must be a non-empty string");
    if (typeof content !== "string" || !content) return fail("invalid_message", "content must be a non-empty string");
    if (!CLIENT_MSG_ID.test(cmid)) return fail("invalid_message", "clientMsgId must be 1-64 of A-Z a-z 0-9 _ . : -");
    const frame = { type: "chat_message", room, content, client_msg_id: cmid };
    if (messageType) frame.message_type = messageType;
    if (metadata !== undefined) frame.metadata = metadata;
    // A frame over the hub's limit closes the socket (1009); queued, it would do so after every
    // reconnect. Refuse it here instead (+64 leaves room for the request_id).
    if (utf8Length(JSON.stringify(frame)) + 64 > this._opts.maxFrameBytes) {
      return fail("message_too_large", "the message is larger than maxFrameBytes");
    }
    if (this._sends.size >= this._opts.maxQueue) return fail("queue_full", "too many unacknowledged messages");
    const d = deferred();
    const entry = {
      cmid, room, frame, promise: d.promise, resolve: d.resolve, reject: d.reject,
      requestId: null, ackTimer: null, retryTimer: null, retries: 0,
    };
    this._sends.set(cmid, entry);
    const st = this._rooms.get(room);
    if (this._established && (!st || st.live)) this._writeSend(entry);
    return d.promise;
  }

  _writeSend(entry) {
    if (entry.requestId !== null || entry.retryTimer !== null || !this._established) return;
    const requestId = this._requestId();
    if (!this._write({ ...entry.frame, request_id: requestId })) return;
    entry.requestId = requestId;
    this._replies.set(requestId, { kind: "send", cmid: entry.cmid });
    entry.ackTimer = setTimeout(() => {
      this._settleSend(entry, new HubError("timeout", "no ack from the hub", { clientMsgId: entry.cmid }));
    }, this._opts.ackTimeoutMs);
  }

  _settleSend(entry, error, ack) {
    if (this._sends.get(entry.cmid) !== entry) return;
    this._sends.delete(entry.cmid);
    clearTimeout(entry.ackTimer);
    clearTimeout(entry.retryTimer);
    if (entry.requestId !== null) this._replies.delete(entry.requestId);
    if (error) entry.reject(error);
    else entry.resolve(ack);
  }

  _onAck(frame) {
    // Matched by client_msg_id (the README's rule: the echo and the ack may come in either order).
    let entry = frame.client_msg_id !== undefined ? this._sends.get(frame.client_msg_id) : undefined;
    if (!entry) {
      const target = frame.request_id !== undefined ? this._replies.get(frame.request_id) : undefined;
      if (target && target.kind === "send") entry = this._sends.get(target.cmid);
    }
    if (frame.request_id !== undefined) this._replies.delete(frame.request_id);
    if (entry) this._settleSend(entry, null, frame);
    this._emitFrame(frame);
  }

  _onError(frame) {
    const target = frame.request_id !== undefined ? this._replies.get(frame.request_id) : undefined;
    if (target) this._replies.delete(frame.request_id);
    if (target?.kind === "send" || (!target && frame.client_msg_id !== undefined)) {
      const entry = this._sends.get(target ? target.cmid : frame.client_msg_id);
      if (entry) this._sendFailed(entry, frame);
    } else if (target?.kind === "join") {
      const st = this._rooms.get(target.room);
      if (st && st.joinRequestId === frame.request_id) this._joinFailed(st, frame);
    } else if (target?.kind === "request") {
      this._settleRequest(target.entry, HubError.fromFrame(frame));
    } else if (target?.kind === "resubscribe") {
      this._subs.delete(target.key); // the renewal was refused (access revoked): stop renewing
    }
    this._emitFrame(frame);
  }

  _sendFailed(entry, frame) {
    clearTimeout(entry.ackTimer);
    entry.ackTimer = null;
    entry.requestId = null;
    if (frame.retryable === true && entry.retries < this._opts.sendRetries) {
      // Nothing was stored (rate_limited, unavailable): try again with the same client_msg_id.
      entry.retries++;
      const wait = Math.max(Number(frame.retry_after_ms) || 0, backoffDelay(entry.retries, this._opts.backoff, this._random));
      entry.retryTimer = setTimeout(() => {
        entry.retryTimer = null;
        const st = this._rooms.get(entry.room);
        if (!st || st.live) this._writeSend(entry);
      }, wait);
      return;
    }
    this._settleSend(entry, HubError.fromFrame(frame));
  }

  _joinFailed(st, frame) {
    clearTimeout(st.joinTimer);
    st.joinTimer = null;
    if (frame.retryable === true && this._established) {
      // The hub could not reach Redis: keep the room and ask again shortly.
      st.joinWritten = false;
      st.joinTimer = setTimeout(() => {
        st.joinTimer = null;
        if (this._rooms.get(st.room) === st && this._established && !st.joinWritten) this._writeJoin(st);
      }, Math.max(Number(frame.retry_after_ms) || 0, backoffDelay(1, this._opts.backoff, this._random)));
      return;
    }
    this._forgetRoom(st, HubError.fromFrame(frame)); // forbidden, invalid_room, ...: never resumed
  }

  // ------------------------------------------------------------------ other requests

  _requestId() {
    return `r${this._nextRequestId++}`;
  }

  /** A request answered by one reply frame with the same request_id. Written now if connected, else
   * after the next connection_established; re-sent after a reconnect (these requests are idempotent)
   * unless `onLost` says otherwise. */
  _request(frame, { onLost = null } = {}) {
    const d = deferred();
    const entry = { frame, resolve: d.resolve, reject: d.reject, requestId: null, timer: null, onLost };
    this._requests.add(entry);
    if (this._established) this._writeRequest(entry);
    return d.promise;
  }

  _writeRequest(entry) {
    if (entry.requestId !== null || !this._requests.has(entry)) return;
    const requestId = this._requestId();
    if (!this._write({ ...entry.frame, request_id: requestId })) return;
    entry.requestId = requestId;
    this._replies.set(requestId, { kind: "request", entry });
    entry.timer = setTimeout(() => {
      this._settleRequest(entry, new HubError("timeout", `no reply to ${entry.frame.type}`));
    }, this._opts.requestTimeoutMs);
  }

  _settleRequest(entry, error, reply) {
    if (!this._requests.delete(entry)) return;
    clearTimeout(entry.timer);
    if (entry.requestId !== null) this._replies.delete(entry.requestId);
    if (error) entry.reject(error);
    else entry.resolve(reply);
  }

  /**
   * Hand the open connection a newer token (`refresh` frame) before the current one expires, so the hub
   * does not close it (4502). Resolves with `token_refreshed`, or null when not connected (the next
   * connection uses the token anyway). Without an argument the token comes from getToken (or the static
   * one). A token given here also replaces the static token for later connections.
   */
  async refreshToken(token) {
    if (token !== undefined && !this._getToken) this._token = token;
    const fresh = token ?? (this._getToken ? await withTimeout(this._getToken(), this._opts.connectTimeoutMs, "getToken timed out") : this._token);
    if (!this._established) return null;
    // Not re-sent after a reconnect: the new connection authenticated with a current token.
    return this._request({ type: "refresh", token: fresh }, { onLost: (entry) => this._settleRequest(entry, null, null) });
  }

  /** The hub warned that the connection's token expires soon: with getToken, refresh it in place. */
  _autoRefresh() {
    if (!this._getToken) return; // the application decides (token_expiring event, refreshToken())
    const ws = this._ws;
    this.refreshToken().catch((error) => {
      if (ws === this._ws) this._emit("connection_error", { stage: "refresh", error });
      // Not fatal: at the deadline the hub closes with 4502 and the reconnect fetches a token again.
    });
  }

  /** Show "typing" in a joined room (ephemeral: not queued while offline). Returns whether it was sent. */
  startTyping(room) {
    return this._typing(room, "typing_start");
  }

  stopTyping(room) {
    return this._typing(room, "typing_stop");
  }

  _typing(room, type) {
    const st = this._rooms.get(room);
    if (!st || !st.live) return false;
    return this._write({ type, room });
  }

  /** Receive an order room's backend events without joining it; renewed after every reconnect. */
  subscribeOrderUpdates(orderId) {
    return this._subscribe("order", orderId, true);
  }

  unsubscribeOrderUpdates(orderId) {
    return this._subscribe("order", orderId, false);
  }

  subscribeQuoteUpdates(quoteId) {
    return this._subscribe("quote", quoteId, true);
  }

  unsubscribeQuoteUpdates(quoteId) {
    return this._subscribe("quote", quoteId, false);
  }

  _subscribe(kind, id, subscribe) {
    const key = `${kind}:${id}`;
    const frame = { type: `${subscribe ? "" : "un"}subscribe_${kind}_updates`, [`${kind}_id`]: id };
    if (subscribe) {
      this._subs.set(key, { kind, id });
      const p = this._request(frame);
      p.catch(() => this._subs.delete(key)); // refused (forbidden, invalid): do not renew it
      return p;
    }
    const had = this._subs.delete(key);
    const local = { type: "unsubscribed", topic: `${kind}_updates`, room: `${kind}_${id}`, [`${kind}_id`]: id };
    if (!had || !this._established) return Promise.resolve(local);
    return this._request(frame, { onLost: (entry) => this._settleRequest(entry, null, local) });
  }

  _writeSubscribe(key, sub) {
    // The first subscribe of a key is a pending request (written with the others); this renews the
    // subscriptions already confirmed on an earlier connection.
    const pending = [...this._requests].some((r) => r.frame[`${sub.kind}_id`] === sub.id && r.frame.type.startsWith("subscribe_"));
    if (pending) return;
    const requestId = this._requestId();
    this._replies.set(requestId, { kind: "resubscribe", key });
    this._write({ type: `subscribe_${sub.kind}_updates`, [`${sub.kind}_id`]: sub.id, request_id: requestId });
  }

  /** Mark a room read up to a message id; resolves with `marked_read`. Other members (and your
   * other devices) get `read_receipt`. */
  markRead(room, upToId) {
    return this._request({ type: "mark_read", room, up_to: upToId });
  }

  /** "online" or "away" in every joined room; kept across reconnects. Resolves with `presence_set`. */
  setPresence(status) {
    if (status !== "online" && status !== "away") {
      const p = Promise.reject(new HubError("invalid_frame", 'status must be "online" or "away"'));
      p.catch(() => {});
      return p;
    }
    this._presence = status;
    for (const entry of [...this._requests]) { // a newer status replaces an unsent older one
      if (entry.frame.type === "presence" && entry.requestId === null) this._settleRequest(entry, null, { type: "presence_set", status });
    }
    return this._request({ type: "presence", status });
  }

  /** Who is present in a room; resolves with `presence_state` ({room, users: [{user_id, status}]}). */
  presenceQuery(room) {
    return this._request({ type: "presence_query", room });
  }

  /** Acknowledge (mark read) inbox notifications by id; resolves with `notification_acked`. */
  ackNotifications(ids) {
    return this._request({ type: "notification_ack", ids: [].concat(ids) });
  }

  /**
   * A page of a room's history over HTTP (`GET /ws/rooms/{room}/messages`, newest first): what to do
   * after a `gap`. Options: `limit`, `before` (a message id), `offset`. Resolves with the response's
   * `data` ({room, messages, has_more, next_before?}). The base URL is the WebSocket URL's origin
   * (ws→http, wss→https) unless `options.httpUrl` was given.
   */
  async fetchHistory(room, { limit = 50, before, offset } = {}) {
    if (typeof this._fetch !== "function") throw new HubError("unsupported", "no fetch() available: pass options.fetch");
    const token = this._getToken ? await this._getToken() : this._token;
    const url = new URL(`${this._httpBase()}/ws/rooms/${encodeURIComponent(room)}/messages`);
    url.searchParams.set("limit", String(limit));
    if (before !== undefined) url.searchParams.set("before", before);
    if (offset !== undefined) url.searchParams.set("offset", String(offset));
    const response = await this._fetch(url.toString(), { headers: { Authorization: `Bearer ${token}` } });
    let body = null;
    try { body = await response.json(); } catch { /* not JSON */ }
    if (!response.ok || !body || body.status !== "success") {
      throw new HubError(body?.error?.code ?? `http_${response.status}`, body?.error?.message ?? `HTTP ${response.status}`);
    }
    return body.data;
  }

  _httpBase() {
    if (this._httpUrl) return this._httpUrl.replace(/\/+$/, "");
    const url = this._wsUrl();
    url.protocol = url.protocol === "wss:" ? "https:" : "http:";
    const path = url.pathname.replace(/\/ws\/connect\/?$/, "").replace(/\/+$/, "");
    return `${url.origin}${path}`;
  }

  // ------------------------------------------------------------------ output

  _write(frame) {
    const ws = this._ws;
    if (!ws || ws.readyState !== WS_OPEN) return false;
    try {
      ws.send(JSON.stringify(frame));
      return true;
    } catch (error) {
      this._emit("connection_error", { stage: "send", error });
      return false;
    }
  }
}

export default HubClient;
