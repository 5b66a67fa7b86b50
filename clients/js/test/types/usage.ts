// Compiled (not run) by types.test.mjs: the declarations accept real usage and reject misuse.
import { HubClient, HubError, backoffDelay, compareIds, type AckFrame, type StateEvent } from "../../streamhub.js";
import { createHubHooks, useHub, useRoomMessages } from "../../react.js";

// Browsers: the DOM's WebSocket class fits the WebSocket option.
const client = new HubClient({ url: "wss://hub.example/ws/connect", token: "t", WebSocket, backoff: { initialMs: 100, jitter: 1 } });
const withGetToken = new HubClient({ url: "ws://127.0.0.1:8000/ws/connect", getToken: async () => "fresh", maxAttempts: Infinity });
// @ts-expect-error: a token or getToken is required
new HubClient({ url: "ws://x/ws/connect" });

const off: () => void = client.on("state", (e: StateEvent) => { const s: "connecting" | "open" | "reconnecting" | "closed" = e.state; void s; });
off();
client.on("chat_message", (m) => { const text: string = m.content; const id: string = m.id; void text; void id; });
client.on("gap", (g) => { void g.previousEpoch; });
client.on("order_status_update", (e) => { void e.data; });
client.on("typing_indicator", (t) => { const typing: boolean = t.is_typing; void typing; });
client.on("error", (e) => { const code: string = e.code; void code; });

async function usage(): Promise<void> {
  await client.connect();
  const joined = await client.joinRoom("order_123", { history: 20 });
  const recovered: boolean = joined.recovered;
  const ack: AckFrame = await client.sendMessage("order_123", "hi", { messageType: "text", metadata: { a: 1 }, clientMsgId: "c-1" });
  const id: string = ack.id;
  // @ts-expect-error: messageType is one of the hub's message types
  await client.sendMessage("order_123", "hi", { messageType: "video" });
  await client.markRead("order_123", id);
  await client.setPresence("away");
  // @ts-expect-error: presence is online or away
  await client.setPresence("busy");
  await client.subscribeOrderUpdates(123);
  const page = await client.fetchHistory("order_123", { limit: 10, before: id });
  void page.messages; void recovered;
  client.startTyping("order_123");
  const refreshed = await client.refreshToken("newer");
  if (refreshed !== null) { const at: string = refreshed.expires_at; void at; }
  await client.leaveRoom("order_123");
  try {
    await client.sendMessage("x", "y");
  } catch (error) {
    if (error instanceof HubError) { const c: string = error.code; void c; }
  }
  client.close();
  withGetToken.close();
}
void usage;

const delay: number = backoffDelay(3, { initialMs: 100, maxMs: 1000, factor: 2, jitter: 0.5 });
const order: number = compareIds("1-0", "2-0");
void delay; void order;

function Component(): null {
  const { state, client: c, sendMessage, joinRoom, authError } = useHub({ url: "ws://x/ws/connect", getToken: () => "t" });
  const messages = useRoomMessages(c, "channel_general", { history: 10 });
  const first: string | undefined = messages[0]?.content;
  void state; void sendMessage; void joinRoom; void authError; void first;
  return null;
}
void Component;
void createHubHooks;
