// The chat page: the real JS client (/ui/client/streamhub.js) against this hub.
// State lives in `rooms` (one entry per joined room); render*() functions redraw from it.

import { HubClient, compareIds, newClientMsgId } from "/ui/client/streamhub.js";
import { $, devToken, el, formatTime, getJson, jwtClaims, tokenStore } from "/ui/static/common.js";

const DEFAULT_ROOM = "channel_general";
const HISTORY = 50;
const MAX_MESSAGES = 300; // kept per room in the page
const MAX_ROOMS = 50; // joined at login (the rooms list's newest)
const TYPING_SEND_EVERY_MS = 3000; // typing starts are re-sent while typing (the hub's indicator times out)
const TYPING_IDLE_MS = 4000; // no keystroke this long: typing stops
const TYPING_SHOWN_MS = 8000; // another user's indicator without a stop is dropped after this long

let client = null;
let me = null;
let token = null;
let active = null;
const rooms = new Map();
let typingSentAt = 0;
let typingRoom = null;
let typingIdleTimer = null;
let typingExpiryTimer = null;

function roomState(name) {
  let room = rooms.get(name);
  if (!room) {
    room = {
      name,
      messages: new Map(), // id -> frame (chat messages and backend events)
      pending: new Map(), // client_msg_id -> {content, status: "sending"|"sent"|"failed", id?}
      unread: 0,
      baseline: null, // newest id at the first join: newer messages are live (counted as unread when unseen)
      lastReadId: null, // my read position
      readMarkSent: null,
      members: new Map(), // user -> "online" | "away" | "offline"
      typing: new Map(), // user -> expiry (ms since epoch)
      receipts: new Map(), // user -> up_to (others' read positions)
      hasMore: true,
    };
    rooms.set(name, room);
  }
  return room;
}

// ------------------------------------------------------------------ login

function showLogin(message = "") {
  $("#login").hidden = false;
  $("#chat").hidden = true;
  $("#logout").hidden = true;
  $("#me").textContent = "";
  $("#login-error").textContent = message;
}

$("#dev-login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const userId = $("#login-user").value.trim();
  try {
    await start(await devToken(userId));
  } catch (error) {
    showLogin(`Dev login failed: ${error.message}`);
  }
});

$("#token-login").addEventListener("submit", async (event) => {
  event.preventDefault();
  await start($("#login-token").value.trim());
});

$("#logout").addEventListener("click", () => {
  tokenStore.clear("token");
  if (client) client.close();
  client = null;
  rooms.clear();
  active = null;
  renderRooms();
  showLogin();
  setState("closed");
});

async function start(newToken) {
  const claims = jwtClaims(newToken);
  if (!claims || typeof claims.sub !== "string") {
    showLogin("That is not a JWT (three dot-separated parts with a sub claim).");
    return;
  }
  // The rooms list first: a refused token gets a clear 401 here, where a browser's WebSocket would only
  // see a failed handshake (and the client would retry it with backoff).
  let listed = [];
  let listError = "";
  try {
    listed = (await getJson("/ws/rooms", newToken)).rooms ?? [];
  } catch (error) {
    if (error.status === 401) {
      tokenStore.clear("token");
      showLogin(`The hub refused this token: ${error.message}`);
      return;
    }
    listError = `Rooms list unavailable: ${error.message}`;
  }
  if (client) client.close();
  rooms.clear(); // another user's rooms, when logging in again
  active = null;
  token = newToken;
  me = claims.sub;
  tokenStore.set("token", token);
  $("#login").hidden = true;
  $("#chat").hidden = false;
  $("#logout").hidden = false;
  $("#me").textContent = `Signed in as ${me}`;
  $("#join-error").textContent = listError;
  document.body.dataset.user = me;

  client = new HubClient({ url: "/ws/connect", token, clientType: "web-ui" });
  wireClient(client);
  try {
    await client.connect();
  } catch (error) {
    showLogin(`Cannot connect: ${error.message}`);
    return;
  }
  for (const entry of listed.slice(0, MAX_ROOMS)) {
    const room = roomState(entry.room);
    room.unread = entry.unread_count ?? 0;
    room.lastReadId = entry.last_read_id ?? null;
  }
  if (listed.length === 0) roomState(DEFAULT_ROOM);
  renderRooms();
  await Promise.all([...rooms.keys()].map((name) => join(name)));
  openRoom(active ?? [...rooms.keys()][0]);
}

async function join(name) {
  try {
    await client.joinRoom(name, { history: HISTORY });
    return true;
  } catch (error) {
    rooms.delete(name);
    renderRooms();
    $("#join-error").textContent = `Cannot join ${name}: ${error.message}`;
    return false;
  }
}

function setState(state) {
  const badge = $("#conn-state");
  badge.dataset.state = state;
  badge.textContent = { open: "online", connecting: "connecting…", reconnecting: "reconnecting…", closed: "offline" }[state] ?? state;
}

// ------------------------------------------------------------------ client events

function wireClient(hub) {
  hub.on("state", ({ state, reason }) => {
    if (hub !== client) return;
    setState(state);
    if (state === "closed" && reason === "auth_error") showLogin("The hub refused the token (expired or revoked): log in again.");
  });
  hub.on("room_joined", (frame) => {
    const room = roomState(frame.room);
    if (room.baseline === null) room.baseline = frame.last_id ?? "0-0";
    for (const { user_id: user, status } of frame.presence ?? []) room.members.set(user, status);
    room.members.set(me, "online");
    if (frame.messages && frame.messages.length < HISTORY) room.hasMore = false;
    renderRooms();
    if (frame.room === active) renderRoom();
  });
  const onRoomFrame = (frame) => addMessage(frame);
  for (const type of ["chat_message", "order_status_update", "quote_update", "payment_update", "system_notification", "deadline_reminder"]) {
    hub.on(type, onRoomFrame);
  }
  hub.on("gap", async ({ room: name }) => {
    // The hub could not replay what was missed: the newest page replaces what the page shows.
    const page = await hub.fetchHistory(name, { limit: HISTORY });
    const room = roomState(name);
    room.messages.clear();
    for (const frame of page.messages.slice().reverse()) room.messages.set(frame.id, frame);
    room.hasMore = page.has_more;
    if (name === active) renderRoom();
  });
  hub.on("typing_indicator", ({ room: name, user_id: user, is_typing: isTyping }) => {
    if (user === me || !rooms.has(name)) return;
    const room = rooms.get(name);
    if (isTyping) room.typing.set(user, Date.now() + TYPING_SHOWN_MS);
    else room.typing.delete(user);
    if (name === active) renderTyping();
  });
  hub.on("presence_update", ({ user_id: user, status, room: name }) => {
    const targets = name ? [rooms.get(name)].filter(Boolean) : [...rooms.values()].filter((r) => r.members.has(user));
    for (const room of targets) {
      room.members.set(user, status);
      if (status === "offline") room.typing.delete(user);
    }
    if (active && targets.some((r) => r.name === active)) {
      renderMembers();
      renderTyping();
    }
  });
  hub.on("read_receipt", ({ room: name, user_id: user, up_to: upTo }) => {
    const room = rooms.get(name);
    if (!room) return;
    if (user === me) {
      // read on another device of mine
      if (!room.lastReadId || compareIds(upTo, room.lastReadId) > 0) room.lastReadId = upTo;
      return;
    }
    const known = room.receipts.get(user);
    if (!known || compareIds(upTo, known) > 0) room.receipts.set(user, upTo);
    if (name === active) renderReceipts();
  });
  hub.on("room_left", ({ room: name, reason }) => {
    if (hub !== client) return;
    rooms.delete(name);
    if (reason === "access_revoked") $("#join-error").textContent = `Access to ${name} was revoked.`;
    if (active === name) active = null;
    renderRooms();
    openRoom(active ?? [...rooms.keys()][0] ?? null);
  });
}

function addMessage(frame) {
  const room = rooms.get(frame.room);
  if (!room || typeof frame.id !== "string" || room.messages.has(frame.id)) return;
  room.messages.set(frame.id, frame);
  if (frame.client_msg_id) room.pending.delete(frame.client_msg_id);
  if (room.messages.size > MAX_MESSAGES) {
    const oldest = [...room.messages.keys()].sort(compareIds)[0];
    room.messages.delete(oldest);
    room.hasMore = true;
  }
  const live = room.baseline !== null && compareIds(frame.id, room.baseline) > 0;
  const unseen = frame.room !== active || document.visibilityState !== "visible";
  if (live && unseen && frame.sender_id !== me) {
    room.unread += 1;
    renderRooms();
  }
  if (frame.sender_id) room.typing.delete(frame.sender_id); // a message ends its sender's typing
  if (frame.room === active) {
    renderMessages();
    renderTyping();
    markSeen(room);
  }
}

/** The active, visible room's newest message is read: one mark_read (the hub fans it out as read_receipt). */
function markSeen(room) {
  if (document.visibilityState !== "visible" || room.name !== active) return;
  const newest = [...room.messages.keys()].sort(compareIds).at(-1);
  room.unread = 0;
  renderRooms();
  if (!newest) return;
  if (room.readMarkSent && compareIds(newest, room.readMarkSent) <= 0) return;
  if (room.lastReadId && compareIds(newest, room.lastReadId) <= 0) return;
  room.readMarkSent = newest;
  client.markRead(room.name, newest).then((frame) => {
    if (!room.lastReadId || compareIds(frame.up_to, room.lastReadId) > 0) room.lastReadId = frame.up_to;
  }, () => {
    room.readMarkSent = null; // retried with the next message or visit
  });
}

document.addEventListener("visibilitychange", () => {
  if (active && rooms.has(active)) markSeen(rooms.get(active));
});

// ------------------------------------------------------------------ rooms

function openRoom(name) {
  active = name && rooms.has(name) ? name : null;
  stopTyping();
  $("#message-input").disabled = active === null;
  $("#send").disabled = active === null;
  $("#message-input").value = "";
  renderRooms();
  renderRoom();
  if (active) {
    markSeen(rooms.get(active));
    $("#message-input").focus();
  }
}

$("#join-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const name = $("#join-room").value.trim();
  $("#join-error").textContent = "";
  if (!client || !name) return;
  const fresh = !rooms.has(name);
  roomState(name);
  renderRooms();
  if (fresh && !(await join(name))) return;
  $("#join-room").value = "";
  openRoom(name);
});

$("#load-older").addEventListener("click", async () => {
  const room = rooms.get(active);
  if (!room) return;
  const oldest = [...room.messages.keys()].sort(compareIds)[0];
  const page = await client.fetchHistory(room.name, { limit: HISTORY, before: oldest });
  for (const frame of page.messages) room.messages.set(frame.id, frame);
  room.hasMore = page.has_more;
  renderMessages({ keepScroll: true });
});

// ------------------------------------------------------------------ composing

$("#composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = $("#message-input");
  const content = input.value.trim();
  if (!content || !active) return;
  input.value = "";
  stopTyping();
  const room = rooms.get(active);
  const clientMsgId = newClientMsgId();
  const entry = { content, status: "sending", id: null, at: new Date().toISOString() };
  room.pending.set(clientMsgId, entry);
  renderMessages();
  $("#send-error").textContent = "";
  client.sendMessage(room.name, content, { clientMsgId }).then((ack) => {
    entry.status = "sent";
    entry.id = ack.id;
    renderMessages();
  }, (error) => {
    entry.status = "failed";
    $("#send-error").textContent = `Not sent: ${error.message}`;
    renderMessages();
  });
});

$("#message-input").addEventListener("input", () => {
  const input = $("#message-input");
  if (!active || !client) return;
  if (input.value.trim() === "") {
    stopTyping();
    return;
  }
  const now = Date.now();
  if (typingRoom !== active || now - typingSentAt > TYPING_SEND_EVERY_MS) {
    if (client.startTyping(active)) {
      typingSentAt = now;
      typingRoom = active;
    }
  }
  clearTimeout(typingIdleTimer);
  typingIdleTimer = setTimeout(stopTyping, TYPING_IDLE_MS);
});

function stopTyping() {
  clearTimeout(typingIdleTimer);
  typingIdleTimer = null;
  if (typingRoom && client) client.stopTyping(typingRoom);
  typingRoom = null;
  typingSentAt = 0;
}

// ------------------------------------------------------------------ rendering

function renderRooms() {
  const list = $("#room-list");
  list.replaceChildren(...[...rooms.values()].map((room) => {
    const online = [...room.members].filter(([user, status]) => user !== me && status !== "offline").length;
    return el("li", {},
      el("button", {
        type: "button", class: room.name === active ? "room active" : "room", dataset: { room: room.name },
        "aria-current": room.name === active ? "true" : null, onclick: () => openRoom(room.name),
      },
      el("span", { class: "room-name" }, room.name),
      online > 0 ? el("span", { class: "dot online", title: `${online} other(s) online` }) : null,
      room.unread > 0 ? el("span", { class: "unread", "aria-label": `${room.unread} unread` }, room.unread > 99 ? "99+" : room.unread) : null));
  }));
}

function renderRoom() {
  $("#room-title").textContent = active ?? "No room";
  renderMembers();
  renderMessages();
  renderTyping();
}

function renderMembers() {
  const room = rooms.get(active);
  const members = room ? [...room.members].sort(([a], [b]) => a.localeCompare(b)) : [];
  $("#members").replaceChildren(...members.map(([user, status]) =>
    el("li", { class: "member", dataset: { user, status }, title: status },
      el("span", { class: `dot ${status}` }), user === me ? `${user} (you)` : user)));
}

function renderMessages({ keepScroll = false } = {}) {
  const pane = $("#message-pane");
  const atBottom = pane.scrollHeight - pane.scrollTop - pane.clientHeight < 40;
  const room = rooms.get(active);
  const list = $("#messages");
  if (!room) {
    list.replaceChildren();
    $("#load-older").hidden = true;
    return;
  }
  const frames = [...room.messages.values()].sort((a, b) => compareIds(a.id, b.id));
  const items = frames.map((frame) => messageItem(frame));
  for (const [clientMsgId, entry] of room.pending) {
    items.push(el("li", { class: `message mine ${entry.status}`, dataset: { clientMsgId } },
      el("div", { class: "meta" }, el("span", { class: "sender" }, me), el("time", {}, formatTime(entry.at))),
      el("p", { class: "content" }, entry.content),
      el("span", { class: "receipt" }, entry.status === "failed" ? "Not sent" : entry.status === "sent" ? "Sent" : "Sending…")));
  }
  list.replaceChildren(...items);
  $("#load-older").hidden = !room.hasMore || frames.length === 0;
  if (!keepScroll && (atBottom || room.pending.size > 0)) pane.scrollTop = pane.scrollHeight;
  renderReceipts();
}

function messageItem(frame) {
  const mine = frame.sender_id === me;
  if (frame.type !== "chat_message") {
    return el("li", { class: "message event", dataset: { id: frame.id } },
      el("div", { class: "meta" }, el("span", { class: "sender" }, frame.type.replace(/_/g, " ")), el("time", {}, formatTime(frame.created_at))),
      el("p", { class: "content" }, frame.content ?? JSON.stringify(frame.data ?? {})));
  }
  return el("li", { class: mine ? "message mine" : "message", dataset: { id: frame.id, sender: frame.sender_id } },
    el("div", { class: "meta" }, el("span", { class: "sender" }, frame.sender_id), el("time", { datetime: frame.created_at }, formatTime(frame.created_at))),
    el("p", { class: "content" }, frame.content),
    mine ? el("span", { class: "receipt" }, "Sent") : null);
}

/** My messages read by others say so: "Read by bob" when bob's read position reached them. */
function renderReceipts() {
  const room = rooms.get(active);
  if (!room) return;
  for (const item of document.querySelectorAll("#messages li.message.mine[data-id]")) {
    const readers = [...room.receipts].filter(([, upTo]) => compareIds(upTo, item.dataset.id) >= 0).map(([user]) => user).sort();
    const receipt = item.querySelector(".receipt");
    receipt.textContent = readers.length ? `Read by ${readers.join(", ")}` : "Sent";
    receipt.classList.toggle("read", readers.length > 0);
  }
}

function renderTyping() {
  clearTimeout(typingExpiryTimer);
  const room = rooms.get(active);
  const now = Date.now();
  const typing = [];
  let next = Infinity;
  for (const [user, expiry] of room?.typing ?? []) {
    if (expiry <= now) room.typing.delete(user);
    else {
      typing.push(user);
      next = Math.min(next, expiry);
    }
  }
  typing.sort();
  const text = typing.length === 0 ? "" : typing.length === 1 ? `${typing[0]} is typing…`
    : `${typing.slice(0, -1).join(", ")} and ${typing.at(-1)} are typing…`;
  $("#typing").textContent = text;
  if (next !== Infinity) typingExpiryTimer = setTimeout(renderTyping, next - now + 10);
}

// ------------------------------------------------------------------ boot

const saved = tokenStore.get("token");
if (saved) start(saved);
else showLogin();
