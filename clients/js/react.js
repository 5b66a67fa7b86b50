/**
 * React bindings for the streamhub client: `useHub` (one HubClient per component tree, its connection
 * state, sendMessage/joinRoom) and `useRoomMessages` (a joined room's messages, kept across reconnects
 * and refilled from history after a gap).
 *
 * No JSX and no build step. React is a peer dependency; `createHubHooks(React)` builds the same hooks
 * from any object with `useState`, `useEffect`, `useRef` and `useCallback` (Preact's compat layer, or a
 * test double).
 */

import * as React from "react";

import { HubClient, HubError, compareIds } from "./streamhub.js";

/** How many components use each (client, room): the room is left when the last one unmounts, so two
 * components showing the same room do not leave it under each other. */
const roomUsers = new WeakMap();

function retainRoom(client, room, history) {
  let rooms = roomUsers.get(client);
  if (!rooms) roomUsers.set(client, (rooms = new Map()));
  rooms.set(room, (rooms.get(room) || 0) + 1);
  return client.joinRoom(room, { history });
}

function releaseRoom(client, room) {
  const rooms = roomUsers.get(client);
  const count = (rooms && rooms.get(room)) || 0;
  if (count > 1) {
    rooms.set(room, count - 1);
    return;
  }
  if (rooms) rooms.delete(room);
  client.leaveRoom(room).catch(() => {}); // the client may be closed already (unmount order)
}

/**
 * `incoming` merged into `list` (both oldest first), one entry per id, at most `limit` (the newest).
 * The common case, one message newer than the last, is a plain append.
 */
export function mergeMessages(list, incoming, limit = Infinity) {
  if (incoming.length === 0) return list;
  const last = list[list.length - 1];
  if (incoming.length === 1 && (!last || compareIds(incoming[0].id, last.id) > 0)) {
    const next = [...list, incoming[0]];
    return next.length > limit ? next.slice(next.length - limit) : next;
  }
  const byId = new Map();
  for (const m of list) byId.set(m.id, m);
  for (const m of incoming) byId.set(m.id, m);
  const merged = [...byId.values()].sort((x, y) => compareIds(x.id, y.id));
  return merged.length > limit ? merged.slice(merged.length - limit) : merged;
}

export function createHubHooks({ useState, useEffect, useRef, useCallback }) {
  /**
   * A connected HubClient for the component's lifetime. Options are HubClient's (`url`, `token` or
   * `getToken`, `WebSocket`, `heartbeatMs`, `backoff`, ...). A new `url` makes a new client; a new
   * `token`/`getToken` is used from the next connection attempt on (after an `auth_error`, render with
   * a fresh token and the client picks it up on its next retry). Other options are read once.
   *
   * Returns `{state, client, sendMessage, joinRoom, authError}`.
   */
  function useHub(options) {
    const latest = useRef(options);
    latest.current = options;
    const holder = useRef(null);
    if (holder.current === null || holder.current.url !== options.url) {
      // Constructing does not connect (the effect does), so creating during render has no side effect.
      const { token, getToken, ...rest } = options;
      const client = new HubClient({
        ...rest,
        // Always through getToken, reading the latest props: a token that changes between renders is
        // used without recreating the client (and its rooms, queue and resume positions).
        getToken: async () => {
          const current = latest.current;
          return typeof current.getToken === "function" ? current.getToken() : current.token;
        },
      });
      holder.current = { url: options.url, client };
    }
    const client = holder.current.client;
    const [state, setState] = useState(client.state);
    const [authError, setAuthError] = useState(null);

    useEffect(() => {
      const offState = client.on("state", (event) => {
        setState(event.state);
        if (event.state === "open") setAuthError(null);
      });
      const offAuth = client.on("auth_error", (event) => setAuthError(event));
      client.connect();
      setState(client.state);
      return () => {
        offState();
        offAuth();
        client.close(); // StrictMode runs effects twice: connect() after close() starts afresh
      };
    }, [client]);

    const sendMessage = useCallback((room, content, opts) => client.sendMessage(room, content, opts), [client]);
    const joinRoom = useCallback((room, opts) => client.joinRoom(room, opts), [client]);
    return { state, client, sendMessage, joinRoom, authError };
  }

  /**
   * The chat messages of `room` (oldest first), joining it while the component is mounted (and leaving
   * when the last user of the room unmounts). Starts with the newest `history` messages, follows live
   * messages (resumed after reconnects: no gap, no duplicate), and after a `gap` (the hub could not
   * replay what was missed) replaces the list with the newest page of history. Keeps at most `limit`.
   * `client` may be null (renders []).
   */
  function useRoomMessages(client, room, { history = 50, limit = 500 } = {}) {
    const [messages, setMessages] = useState([]);

    useEffect(() => {
      if (!client || !room) return undefined;
      let active = true;
      let afterGap = null; // live messages received since a gap, kept while history is fetched
      setMessages([]);
      const offMessage = client.on("chat_message", (message) => {
        if (message.room !== room) return;
        if (afterGap) afterGap.push(message);
        setMessages((list) => mergeMessages(list, [message], limit));
      });
      const offGap = client.on("gap", (event) => {
        if (event.room !== room) return;
        afterGap = [];
        client.fetchHistory(room, { limit: Math.min(limit, 100) }).then((page) => {
          if (!active) return;
          const older = page.messages.filter((m) => m.type === "chat_message").reverse(); // oldest first
          setMessages(mergeMessages(older, afterGap, limit));
          afterGap = null;
        }, () => {
          afterGap = null; // history unavailable: keep what we have; live messages keep coming
        });
      });
      retainRoom(client, room, history).then((joined) => {
        // A room another component had already joined answers with its earlier room_joined: seed from it.
        if (active && joined && Array.isArray(joined.messages)) {
          setMessages((list) => mergeMessages(list, joined.messages.filter((m) => m.type === "chat_message"), limit));
        }
      }, () => {}); // refused joins surface as the client's "error" events
      return () => {
        active = false;
        offMessage();
        offGap();
        releaseRoom(client, room);
      };
    }, [client, room, history, limit]);

    return client && room ? messages : EMPTY;
  }

  return { useHub, useRoomMessages };
}

const EMPTY = Object.freeze([]);

export const { useHub, useRoomMessages } = createHubHooks(React);
export { HubClient, HubError };
