// Types for react.js (React hooks over the streamhub client). Written without React's own types so
// that using the client alone needs no @types/react.

import type { AckFrame, ChatMessageFrame, ConnectionState, HubClient, HubClientOptions, RoomJoinedFrame, SendOptions, AuthErrorEvent } from "./streamhub.js";

export { HubClient, HubError } from "./streamhub.js";

export interface UseHubResult {
  state: ConnectionState;
  client: HubClient;
  sendMessage(room: string, content: string, options?: SendOptions): Promise<AckFrame>;
  joinRoom(room: string, options?: { history?: number }): Promise<RoomJoinedFrame>;
  /** The last auth_error since the connection was last open (render a fresh token to recover). */
  authError: AuthErrorEvent | null;
}

export interface UseRoomMessagesOptions {
  /** Newest messages loaded on join. Default 50. */
  history?: number;
  /** Most messages kept (the newest). Default 500. */
  limit?: number;
}

export declare function useHub(options: HubClientOptions): UseHubResult;
export declare function useRoomMessages(client: HubClient | null | undefined, room: string | null | undefined,
  options?: UseRoomMessagesOptions): readonly ChatMessageFrame[];

/** Messages merged by id, oldest first, at most `limit`. */
export declare function mergeMessages<T extends { id: string }>(list: readonly T[], incoming: readonly T[], limit?: number): T[];

export interface HookPrimitives {
  useState<S>(initial: S | (() => S)): [S, (next: S | ((previous: S) => S)) => void];
  useEffect(effect: () => void | (() => void), deps?: readonly unknown[]): void;
  useRef<T>(initial: T): { current: T };
  useCallback<F extends (...args: any[]) => any>(callback: F, deps: readonly unknown[]): F;
}

/** The same hooks built from any React-compatible primitives (Preact compat, a test double). */
export declare function createHubHooks(primitives: HookPrimitives): {
  useHub: typeof useHub;
  useRoomMessages: typeof useRoomMessages;
};
