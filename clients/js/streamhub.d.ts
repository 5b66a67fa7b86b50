// Types for streamhub.js (the streamhub WebSocket client). Frame shapes follow the hub's README, "Protocol".

/** A Redis stream id, e.g. "1732550400000-0": increasing within a room. */
export type StreamId = string;

export type ConnectionState = "connecting" | "open" | "reconnecting" | "closed";
export type PresenceStatus = "online" | "away";
export type MessageType = "text" | "file" | "image" | "system";

export interface BackoffOptions {
  /** Ceiling of the first reconnect delay (ms). Default 500. */
  initialMs?: number;
  /** Largest ceiling (ms). Default 30000. */
  maxMs?: number;
  /** Growth of the ceiling per attempt. Default 2. */
  factor?: number;
  /** Fraction of each delay that is random: 1 (default) = full jitter, 0.5 = equal jitter, 0 = none. */
  jitter?: number | boolean;
  /** A connection that stayed up this long resets the attempt count (ms). Default 5000. */
  resetAfterMs?: number;
}

/** The subset of the WebSocket API the client uses (browsers' WebSocket, the `ws` package). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  // `any`: the DOM's handler types (this: WebSocket, ev: MessageEvent) and ws's differ; the client
  // reads event.data, event.code, event.reason and event.message only.
  onopen: any;
  onmessage: any;
  onclose: any;
  onerror: any;
  terminate?(): void;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface HubClientOptionsBase {
  /** The hub's WebSocket URL, e.g. "wss://hub.example.com/ws/connect", or relative to the page ("/ws/connect"). */
  url: string;
  /** Required in Node (e.g. `import WebSocket from "ws"`); defaults to globalThis.WebSocket. */
  WebSocket?: WebSocketConstructor;
  /** Ping interval (ms); default: the hub's heartbeat_s. No frame for 2 intervals forces a reconnect. */
  heartbeatMs?: number | null;
  backoff?: BackoffOptions;
  /** Consecutive failed reconnects before giving up (state "closed", reason "max_attempts"). Default Infinity. */
  maxAttempts?: number;
  /** Socket open + connection_established deadline (ms). Default 10000. */
  connectTimeoutMs?: number;
  /** Time from writing a chat_message to its ack on a live connection (ms). Default 15000. */
  ackTimeoutMs?: number;
  /** Time from writing a request (join, mark_read, ...) to its reply (ms). Default 15000. */
  requestTimeoutMs?: number;
  /** Automatic retries of a send refused with retryable: true. Default 5. */
  sendRetries?: number;
  /** Unacknowledged messages held at once; more are rejected with "queue_full". Default 1000. */
  maxQueue?: number;
  /** Largest frame sent (the hub's server.max_frame_bytes). Default 1048576. */
  maxFrameBytes?: number;
  /** Query parameters recorded by the hub with the connection. clientType defaults to "web". */
  clientType?: string;
  clientVersion?: string;
  deviceId?: string;
  /** Base URL of the REST endpoints for fetchHistory (default: the WebSocket URL's origin). */
  httpUrl?: string;
  /** fetch implementation for fetchHistory (default: globalThis.fetch). */
  fetch?: typeof fetch;
  /** Receives errors thrown by event handlers (default: reportError or console.error). */
  onHandlerError?: (error: unknown) => void;
  /** Random source of the backoff jitter (tests). */
  random?: () => number;
}
export type HubClientOptions = HubClientOptionsBase &
  ({ token: string; getToken?: () => Promise<string> | string } | { token?: string; getToken: () => Promise<string> | string });

// ------------------------------------------------------------------ server frames

interface Reply {
  request_id?: string | number;
}

export interface ConnectionEstablishedFrame {
  type: "connection_established";
  connection_id: string;
  user_id: string;
  server_time: string;
  heartbeat_s: number;
}

export interface ChatMessageFrame {
  type: "chat_message";
  room: string;
  id: StreamId;
  sender_id: string;
  content: string;
  message_type: MessageType;
  created_at: string;
  client_msg_id?: string;
  metadata?: Record<string, unknown>;
}

export type EventType = "order_status_update" | "quote_update" | "payment_update" | "system_notification" | "deadline_reminder";

export interface BackendEventFrame<T extends EventType = EventType> {
  type: T;
  room: string;
  id: StreamId;
  created_at: string;
  data: Record<string, unknown>;
  sender_id?: string;
  content?: string;
}

export type RoomFrame = ChatMessageFrame | BackendEventFrame;

export interface RoomJoinedFrame extends Reply {
  type: "room_joined";
  room: string;
  epoch: string;
  last_id: StreamId;
  recovered: boolean;
  messages: RoomFrame[];
  already_joined?: boolean;
  presence?: Array<{ user_id: string; status: PresenceStatus }>;
}

export interface RoomLeftFrame extends Reply {
  type: "room_left";
  room: string;
  reason: "left" | "access_revoked";
}

export interface AckFrame extends Reply {
  type: "ack";
  room: string;
  id: StreamId;
  client_msg_id?: string;
  duplicate?: true;
}

export interface SubscribedFrame extends Reply {
  type: "subscribed" | "unsubscribed";
  topic: "order_updates" | "quote_updates";
  room: string;
  order_id?: number;
  quote_id?: number;
}

export interface TypingIndicatorFrame {
  type: "typing_indicator";
  room: string;
  user_id: string;
  is_typing: boolean;
}

export interface PresenceUpdateFrame {
  type: "presence_update";
  user_id: string;
  status: PresenceStatus | "offline";
  room?: string;
  last_seen?: string;
}

export interface PresenceSetFrame extends Reply {
  type: "presence_set";
  status: PresenceStatus;
}

export interface PresenceStateFrame extends Reply {
  type: "presence_state";
  room: string;
  users: Array<{ user_id: string; status: PresenceStatus }>;
}

export interface MarkedReadFrame extends Reply {
  type: "marked_read";
  room: string;
  up_to: StreamId;
}

export interface ReadReceiptFrame {
  type: "read_receipt";
  room: string;
  user_id: string;
  up_to: StreamId;
}

export interface NotificationAckedFrame extends Reply {
  type: "notification_acked";
  ids: StreamId[];
}

/** Sent by hubs that enforce token expiry on open connections, before closing with 4502. */
export interface TokenExpiringFrame {
  type: "token_expiring";
  expires_at: string;
  in_s: number;
}

export interface TokenRefreshedFrame extends Reply {
  type: "token_refreshed";
  expires_at: string;
}

export interface PongFrame extends Reply {
  type: "pong";
  server_time: string;
}

export interface ErrorFrame extends Reply {
  type: "error";
  code: string;
  message: string;
  request_type?: string;
  room?: string;
  retryable?: true;
  retry_after_ms?: number;
  client_msg_id?: string;
}

export type ServerFrame =
  | ConnectionEstablishedFrame | RoomJoinedFrame | RoomLeftFrame | ChatMessageFrame | BackendEventFrame | AckFrame
  | SubscribedFrame | TypingIndicatorFrame | PresenceUpdateFrame | PresenceSetFrame | PresenceStateFrame
  | MarkedReadFrame | ReadReceiptFrame | NotificationAckedFrame | TokenExpiringFrame | TokenRefreshedFrame | PongFrame
  | ErrorFrame;

// ------------------------------------------------------------------ client events

export interface StateEvent {
  state: ConnectionState;
  previous: ConnectionState;
  /** Reconnect attempt number (0 for the first connect). */
  attempt?: number;
  /** "reconnecting": the delay before this attempt (ms). */
  delayMs?: number;
  /** Close code of the connection that was lost, when there was one. */
  code?: number | null;
  /** Why: the close reason, "heartbeat timeout", "connect timeout", or on "closed": "client",
   * "auth_error", "max_attempts". */
  reason?: string;
  /** HTTP status of a refused handshake (Node's `ws` reports it; browsers do not). */
  status?: number | null;
  connectionId?: string | null;
}

export interface GapEvent {
  room: string;
  epoch: string;
  lastId: StreamId;
  previousEpoch: string | null;
  previousLastId: StreamId | null;
}

export interface AuthErrorEvent {
  code: number | null;
  reason: string;
  status: number | null;
  /** The token's exp had passed (the hub's refusal is invisible to browsers). */
  expired: boolean;
  attempt: number;
}

export interface ConnectionErrorEvent {
  stage: "token" | "socket" | "send" | "refresh";
  error: unknown;
  status?: number | null;
}

export interface ClientEvents {
  state: StateEvent;
  gap: GapEvent;
  auth_error: AuthErrorEvent;
  connection_error: ConnectionErrorEvent;
  "*": ServerFrame;
  connection_established: ConnectionEstablishedFrame;
  room_joined: RoomJoinedFrame;
  room_left: RoomLeftFrame;
  chat_message: ChatMessageFrame;
  order_status_update: BackendEventFrame<"order_status_update">;
  quote_update: BackendEventFrame<"quote_update">;
  payment_update: BackendEventFrame<"payment_update">;
  system_notification: BackendEventFrame<"system_notification">;
  deadline_reminder: BackendEventFrame<"deadline_reminder">;
  ack: AckFrame;
  subscribed: SubscribedFrame;
  unsubscribed: SubscribedFrame;
  typing_indicator: TypingIndicatorFrame;
  presence_update: PresenceUpdateFrame;
  presence_set: PresenceSetFrame;
  presence_state: PresenceStateFrame;
  marked_read: MarkedReadFrame;
  read_receipt: ReadReceiptFrame;
  notification_acked: NotificationAckedFrame;
  token_expiring: TokenExpiringFrame;
  token_refreshed: TokenRefreshedFrame;
  pong: PongFrame;
  error: ErrorFrame;
}

export interface SendOptions {
  messageType?: MessageType;
  metadata?: Record<string, unknown>;
  /** 1-64 of A-Z a-z 0-9 _ . : - ; generated when absent. Reuse it to retry safely. */
  clientMsgId?: string;
}

export interface RoomPosition {
  room: string;
  epoch: string | null;
  lastId: StreamId | null;
  live: boolean;
}

export interface HistoryPage {
  room: string;
  /** Newest first. */
  messages: RoomFrame[];
  has_more: boolean;
  limit: number;
  next_before?: StreamId;
}

export declare const DEFAULT_BACKOFF: Readonly<Required<BackoffOptions>>;
export declare const ROOM_FRAME_TYPES: readonly string[];

/** Delay (ms) before reconnect attempt `attempt` (1, 2, ...): full jitter under an exponential ceiling. */
export declare function backoffDelay(attempt: number, options?: BackoffOptions, random?: () => number): number;
/** Negative, 0 or positive, like a comparator. Exact for ids of any length. */
export declare function compareIds(a: StreamId, b: StreamId): number;
export declare function newClientMsgId(): string;

export declare class HubError extends Error {
  /** The hub's error code (invalid_room, forbidden, not_joined, rate_limited, ...) or the client's
   * (timeout, closed, queue_full, left, access_revoked, unauthorized, max_attempts, message_too_large). */
  readonly code: string;
  readonly frame: ErrorFrame | null;
  readonly retryable: boolean;
  readonly retryAfterMs: number | null;
  readonly clientMsgId: string | null;
  constructor(code: string, message?: string, extra?: { frame?: ErrorFrame; retryable?: boolean; retryAfterMs?: number; clientMsgId?: string });
  static fromFrame(frame: ErrorFrame): HubError;
}

export declare class HubClient {
  constructor(options: HubClientOptions);
  readonly state: ConnectionState;
  /** Messages sent and not yet acknowledged (queued or in flight). */
  readonly pendingCount: number;
  /** Rooms kept joined (and resumed after reconnects). */
  readonly rooms: string[];
  connectionId: string | null;
  userId: string | null;
  readonly stats: { connects: number; duplicatesDropped: number };

  on<K extends keyof ClientEvents>(type: K, handler: (event: ClientEvents[K]) => void): () => void;
  on(type: string, handler: (event: any) => void): () => void;
  off<K extends keyof ClientEvents>(type: K, handler: (event: ClientEvents[K]) => void): void;
  off(type: string, handler: (event: any) => void): void;

  /** Resolves when first established; rejects if the client stops before (close, auth error, maxAttempts). */
  connect(): Promise<ConnectionEstablishedFrame>;
  /** No more reconnects; pending sends/requests reject with code "closed"; rooms are forgotten. */
  close(code?: number, reason?: string): void;
  /** Replace the static token (used from the next attempt on; then call connect() after an auth_error). */
  setToken(token: string): void;
  getRoom(room: string): RoomPosition | null;
  /** Send a newer token on the open connection (hubs that enforce expiry); null when not connected. */
  refreshToken(token?: string): Promise<TokenRefreshedFrame | null>;

  joinRoom(room: string, options?: { history?: number }): Promise<RoomJoinedFrame>;
  leaveRoom(room: string): Promise<RoomLeftFrame>;
  sendMessage(room: string, content: string, options?: SendOptions): Promise<AckFrame>;
  startTyping(room: string): boolean;
  stopTyping(room: string): boolean;
  subscribeOrderUpdates(orderId: number | string): Promise<SubscribedFrame>;
  unsubscribeOrderUpdates(orderId: number | string): Promise<SubscribedFrame>;
  subscribeQuoteUpdates(quoteId: number | string): Promise<SubscribedFrame>;
  unsubscribeQuoteUpdates(quoteId: number | string): Promise<SubscribedFrame>;
  markRead(room: string, upToId: StreamId): Promise<MarkedReadFrame>;
  setPresence(status: PresenceStatus): Promise<PresenceSetFrame>;
  presenceQuery(room: string): Promise<PresenceStateFrame>;
  ackNotifications(ids: StreamId | StreamId[]): Promise<NotificationAckedFrame>;
  fetchHistory(room: string, options?: { limit?: number; before?: StreamId; offset?: number }): Promise<HistoryPage>;
}

export default HubClient;
