// Type declarations of react.js: React (>= 18) hooks over the pgbridge client
// (docs/clients/react.md; the protocol: docs/PROTOCOL.md).

import type {
  BridgeError, BridgeEvent, PgBridge, Presence, Row, Subscription,
} from "./pgbridge.js";

/** A row of `messages` as snapshots and events carry it (the generated row type of
 * pgbridge.d.ts, from sql/schema.sql; timestamps are ISO 8601 strings). In `useRoom`'s
 * messages `deleted_at` is always null: a soft-deleted row leaves the list. */
export type MessageRow = Row<"messages">;

/** Where a hook's subscription stands:
 * - `idle`: no bridge or no room given (nothing is subscribed);
 * - `connecting`: subscribing, or (useRoom) waiting for the snapshot;
 * - `live`: subscribed on the current connection (useRoom: the snapshot is held);
 * - `reconnecting`: the connection dropped; the client resumes the room after the last seq
 *   held (nothing lost or repeated), and the hook shows what it held meanwhile;
 * - `error`: the subscription ended or could not be made (`error` says why);
 * - `closed`: the bridge was closed (`bridge.close()`, or it gave up: see its `error` event). */
export type RoomStatus = "idle" | "connecting" | "live" | "reconnecting" | "error" | "closed";

/** Why a hook's room has `status` "error": a fatal {@link BridgeError} of the subscription
 * (`forbidden`, `not_found`, `membership_revoked`, `room_deleted`, `cursor_expired`, ...), or
 * the Error `bridge.subscribe()` threw: TypeError for a malformed room id, Error when code
 * outside these hooks already follows the room on this bridge. It stays until every hook of
 * the room unmounts; the next one to mount tries again. */
export type RoomError = BridgeError | Error;

export interface UseRoomOptions {
  /** How many of the most recent messages to load first (PROTOCOL.md, "Snapshot then live"):
   * an integer from 1 to the server's PGBRIDGE_SNAPSHOT_MAX (default 1000); default 50;
   * else TypeError when the hook is called. Taken when the room's shared subscription is made:
   * the largest of the hooks mounted then. */
  snapshot?: number;
  /** Each event of the room, once, in seq order (every table: `reactions`,
   * `channel_members`, ...; `messages` too, already applied to `messages`). The latest
   * function given is called; events before the hook mounted are not replayed. */
  onEvent?(event: BridgeEvent): void;
}

export interface RoomState {
  /** The room's messages, oldest first: the snapshot's rows, then each one inserted, in seq
   * order; an UPDATE replaces its row, a soft delete (`deleted_at` set) or DELETE removes it.
   * A new frozen array on each change (the rows themselves are the events' `data`). Older
   * history is the application's to load (created_at before the first row's). */
  readonly messages: readonly MessageRow[];
  readonly status: RoomStatus;
  /** Set with `status` "error", else null. */
  readonly error: RoomError | null;
  /** The shared Subscription (to `ack`, `pending(id)` for optimistic sends, ...); null while
   * none. A new one when the hooks subscribe again (a usePresence or useTypists mounted after
   * useRoom): the old one's pending ids reject with `unsubscribed`. Do not `unsubscribe()`
   * it: the hooks do, when the last of them unmounts. */
  readonly subscription: Subscription | null;
}

export interface PresenceState {
  /** user id -> their last presence received (`online`, `status`, `lastSeen`,
   * `customStatus`): after each (re)subscribe, one per member of the room (the bridge's
   * own user included), then each change. A new Map on each change; as last known while
   * reconnecting. */
  readonly members: ReadonlyMap<string, Presence>;
  readonly status: RoomStatus;
  readonly error: RoomError | null;
}

export interface TypistsState {
  /** The members (user ids) who signalled typing less than 5 s ago, in the order they
   * started, never the bridge's own user; a new frozen array on each change. */
  readonly typists: readonly string[];
  /** Say that this user is typing (call it on every keystroke: at most one signal a second
   * is sent). Returns false when not sent: throttled, the room not subscribed on the current
   * connection yet, or no bridge/room. Stable while the bridge and room are. */
  typing(): boolean;
}

/** The number of messages `useRoom` loads first when `snapshot` is not given (50). */
export declare const DEFAULT_SNAPSHOT: number;

/**
 * The room's messages, kept current: the `snapshot` most recent, then every change, across
 * reconnects (each event once, in order). `bridge` or `room` null or undefined: `idle`.
 * Shares one Subscription with every other hook of the same bridge and room; subscribes once
 * mounted, unsubscribes when the last of them unmounts (or their bridge or room changes).
 * Acknowledges each event it receives (`autoAck`): the room counts as read.
 * Throws TypeError for a bad `snapshot`.
 */
export declare function useRoom(bridge: PgBridge | null | undefined,
  room: string | null | undefined, options?: UseRoomOptions): RoomState;

/**
 * The room's members and their presence (the subscription asks for `presence`). Shares the
 * room's Subscription with the other hooks: mounted after a `useRoom` of the room, it
 * subscribes again with `presence`, resuming after the last seq held (nothing lost). Acks
 * nothing by itself.
 */
export declare function usePresence(bridge: PgBridge | null | undefined,
  room: string | null | undefined): PresenceState;

/**
 * Who is typing in the room, and `typing()` to signal that this user is. Shares the room's
 * Subscription (with `presence`, as usePresence). Acks nothing by itself.
 */
export declare function useTypists(bridge: PgBridge | null | undefined,
  room: string | null | undefined): TypistsState;
