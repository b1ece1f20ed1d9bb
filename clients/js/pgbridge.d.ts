// Type declarations of pgbridge.js, the browser/Node client of the pgbridge protocol
// (docs/PROTOCOL.md). The row types below are generated from sql/ (see the block's header).

// BEGIN GENERATED ROWS
// by clients/js/scripts/row_types.py from sql/: run `.venv/bin/python clients/js/scripts/row_types.py --write`
// after changing the tables; tests/unit/test_row_types.py fails while stale.

/** A JSON value (a `jsonb` column). */
export type Json = string | number | boolean | null | Json[] | { [key: string]: Json };

/** A row of `channels` as an event's `data` carries it (`to_jsonb`). */
export interface ChannelsRow {
  /** VARCHAR(26) NOT NULL */
  id: string;
  /** VARCHAR(255) NOT NULL */
  name: string;
  /** TEXT */
  description: string | null;
  /** TIMESTAMPTZ NOT NULL */
  created_at: string;
  /** TIMESTAMPTZ NOT NULL */
  updated_at: string;
  /** TIMESTAMPTZ */
  deleted_at: string | null;
}

/** A row of `messages` as an event's `data` carries it (`to_jsonb`). */
export interface MessagesRow {
  /** VARCHAR(26) NOT NULL */
  id: string;
  /** VARCHAR(26) NOT NULL */
  channel_id: string;
  /** VARCHAR(26) NOT NULL */
  user_id: string;
  /** TEXT NOT NULL */
  content: string;
  /** TIMESTAMPTZ NOT NULL */
  created_at: string;
  /** TIMESTAMPTZ NOT NULL */
  updated_at: string;
  /** TIMESTAMPTZ */
  deleted_at: string | null;
  /** JSONB */
  metadata: Json | null;
}

/** A row of `channel_members` as an event's `data` carries it (`to_jsonb`). */
export interface ChannelMembersRow {
  /** VARCHAR(26) NOT NULL */
  channel_id: string;
  /** VARCHAR(26) NOT NULL */
  user_id: string;
  /** VARCHAR(50) NOT NULL */
  role: "owner" | "admin" | "member" | "guest";
  /** TIMESTAMPTZ NOT NULL */
  joined_at: string;
}

/** A row of `reactions` as an event's `data` carries it (`to_jsonb`). */
export interface ReactionsRow {
  /** VARCHAR(26) NOT NULL */
  id: string;
  /** VARCHAR(26) NOT NULL */
  message_id: string;
  /** VARCHAR(26) NOT NULL */
  user_id: string;
  /** VARCHAR(50) NOT NULL */
  emoji: string;
  /** TIMESTAMPTZ NOT NULL */
  created_at: string;
}

/** A row of `files` as an event's `data` carries it (`to_jsonb`). */
export interface FilesRow {
  /** VARCHAR(26) NOT NULL */
  id: string;
  /** VARCHAR(26) */
  message_id: string | null;
  /** VARCHAR(255) NOT NULL */
  name: string;
  /** VARCHAR(100) NOT NULL */
  type: string;
  /** BIGINT NOT NULL */
  size: number;
  /** TEXT NOT NULL */
  url: string;
  /** TIMESTAMPTZ NOT NULL */
  created_at: string;
}

/** A row of `message_reads` as an event's `data` carries it (`to_jsonb`). */
export interface MessageReadsRow {
  /** VARCHAR(26) NOT NULL */
  message_id: string;
  /** VARCHAR(26) NOT NULL */
  user_id: string;
  /** TIMESTAMPTZ NOT NULL */
  read_at: string;
}

/** The published tables (those with a capture trigger) and their rows. */
export interface Rows {
  channels: ChannelsRow;
  messages: MessagesRow;
  channel_members: ChannelMembersRow;
  reactions: ReactionsRow;
  files: FilesRow;
  message_reads: MessageReadsRow;
}

/** The name of a published table: an event's `table`. */
export type TableName = keyof Rows;
// END GENERATED ROWS

/** A row of a published table, as an event's `data` carries it: `Row<"messages">`. */
export type Row<T extends TableName> = Rows[T];

/** What every `event` frame of table `T` carries. */
interface EventFields<T extends TableName> {
  type: "event";
  room: string;
  /** 1, 2, 3, … per room in commit order. */
  seq: number;
  table: T;
  /** The row's id (`a:b` for a two-column key: `channel_id:user_id`, `message_id:user_id`). */
  id: string;
  /** Commit-time ISO 8601. */
  ts: string;
}

/** A row written: `data` is the row as it is after the INSERT or UPDATE. */
export interface WriteEvent<T extends TableName> extends EventFields<T> {
  op: "INSERT" | "UPDATE";
  data: Rows[T];
}

/** A row deleted: `data` is the row as it was before the DELETE (an UPDATE that moves a row to
 * another room, or changes its key, is a DELETE in the old room first). */
export interface DeleteEvent<T extends TableName> extends EventFields<T> {
  op: "DELETE";
  data: Rows[T];
}

/** A protocol `event` frame of table `T`. */
export type EventOf<T extends TableName> = WriteEvent<T> | DeleteEvent<T>;

/** A protocol `event` frame: one change of a room, delivered once per seq, in order. A union
 * discriminated on `table` (then `op`): after `if (event.table === "messages")`, `event.data`
 * is a {@link MessagesRow}. The tables are those this version of pgbridge publishes (the same
 * version as the daemon, which sends no other); code that must also take events of tables a
 * newer daemon adds can widen an event to {@link AnyBridgeEvent} first. */
export type BridgeEvent = { [T in TableName]: EventOf<T> }[TableName];

/** Any `event` frame, whatever its table, as docs/PROTOCOL.md defines it. */
export interface AnyBridgeEvent {
  type: "event";
  room: string;
  seq: number;
  table: string;
  op: "INSERT" | "UPDATE" | "DELETE";
  id: string;
  data: Record<string, unknown>;
  ts: string;
}

/** What `pending(id)` resolves with when the row was already in the room's snapshot. */
export interface SnapshotInsert {
  type: "snapshot";
  room: string;
  /** The snapshot's seq: the row's INSERT is at or before it. */
  seq: number;
  table: "messages";
  op: "INSERT";
  id: string;
  /** The row, as in the snapshot. */
  data: MessagesRow;
}

/** A protocol `subscribed` frame: events with `seq > from` follow; `head` is the room's latest. */
export interface SubscribedFrame {
  type: "subscribed";
  room: string;
  from: number;
  head: number;
  ref: string | null;
}

/** The `snapshot` frame (PROTOCOL.md, "Snapshot then live"): the room's most recent messages
 * as of `seq`, oldest first; events after `seq` follow. */
export interface Snapshot {
  room: string;
  seq: number;
  /** Rows of `messages` not soft-deleted, shaped like an event's `data`, oldest first. */
  messages: MessagesRow[];
  /** Older messages of the N asked for were left out (PGBRIDGE_SNAPSHOT_MAX_BYTES). */
  truncated: boolean;
}

/** A room member's presence, from a protocol `presence` frame (subscriptions with
 * `presence: true` only); the last one received for a user is their current state. */
export interface Presence {
  readonly room: string;
  /** The member's `users.id`. */
  readonly user: string;
  /** True while the user has a connection to the bridge (or had one within its grace time). */
  readonly online: boolean;
  /** `online` or `offline` as the bridge keeps it, or one the application set (`away`, …). */
  readonly status: string;
  /** ISO 8601 (UTC): when the user came online or, offline, when they left; null: never seen. */
  readonly lastSeen: string | null;
  /** Set by the application, or null. */
  readonly customStatus: string | null;
}

/** A protocol `typing` frame: `user` is typing in `room` (never the bridge's own user). */
export interface TypingSignal {
  room: string;
  user: string;
}

export interface BridgeError {
  /** A protocol error code (`forbidden`, `not_found`, `cursor_expired`, `rate_limited`,
   * `internal`, `bad_request`, `unauthorized`, …), an `unsubscribed` reason
   * (`membership_revoked`, `room_deleted`), or one of the client's: `unauthorized`,
   * `forbidden_origin`, `user_deleted` (close 4003), `policy_violation` (1008),
   * `message_too_big` (1009), `invalid_payload` (1007), `connect_failed` (see `cause`),
   * `token_unavailable`. */
  code: string;
  message: string;
  /** The room concerned, if any. */
  room?: string;
  /** True: the refusal of `bridge.feed()`'s `feed` request (`fatal`: the feed ended;
   * else, `rate_limited` or `internal`, it is sent again after a backoff delay). */
  feed?: boolean;
  /** With a room: the subscription ended. With `feed`: the feed ended. Without either: the
   * bridge gave up and is "closed". */
  fatal: boolean;
  /** The close code behind a fatal close. */
  closeCode?: number;
  /** The HTTP status of a refused handshake (found by asking the URL without upgrade, or
   * as Node's `ws` reports it); with `cause` "http". */
  status?: number;
  /** With `connect_failed`: why the attempt failed. Not fatal (a retry follows after the
   * `state` event's `delay`), once per failed attempt, except "websocket" (fatal: the
   * WebSocket constructor threw, e.g. on an unusable URL). */
  cause?: ConnectFailure;
  /** With `connect_failed`: the system error code when the transport gives one (Node's `ws`:
   * `ECONNREFUSED`, `ENOTFOUND`, `CERT_HAS_EXPIRED`, …; browsers give none). */
  errno?: string;
  /** With `connect_failed`: the attempt that failed (0: the first connection, n: the n-th
   * retry since the last connection that stayed open 5 s). */
  attempt?: number;
}

/** Why a connection attempt failed before the WebSocket opened. "refused": nothing listens
 * on the port; "unreachable": no route or no such host (in a browser, which hides the
 * reason: any network failure of the probe); "timeout"; "reset": the connection was cut
 * during the handshake; "tls": the certificate or the TLS handshake was refused; "http": the
 * server answered with `status` instead of upgrading (503 or 429: busy; 426: the bridge takes
 * the token, but the upgrade failed on the way, e.g. a proxy that drops it), or, without
 * `status`, answered a page of another origin, which the browser may not read (most often: the
 * origin is not allowed); "unknown": the transport said nothing and no probe was possible
 * (`fetch: null`); "websocket": the WebSocket constructor threw (fatal). */
export type ConnectFailure = "refused" | "unreachable" | "timeout" | "reset" | "tls" | "http"
  | "unknown" | "websocket";

/** What the client needs of a WebSocket (browsers', Node's, the `ws` package's). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

/** addEventListener options, without depending on the DOM library's names. */
export type ListenerOptions = boolean | {
  capture?: boolean; once?: boolean; passive?: boolean; signal?: AbortSignal;
};

export type BridgeState = "connecting" | "open" | "reconnecting" | "closed";

export interface StateDetail {
  state: BridgeState;
  /** Close code and reason of the close that caused this state (null: none). */
  code: number | null;
  reason: string | null;
  /** Reconnection attempts since the last connection that stayed open 5 s (1 = first retry). */
  attempt: number;
  /** Milliseconds before the next attempt ("reconnecting"), else null. */
  delay: number | null;
  /** With "open" only: the new connection's correlation id (as `PgBridge.correlationId`). */
  correlationId?: string | null;
}

export interface PgBridgeOptions {
  /** A JWT, or a function returning one (called before every connection attempt and
   * `refreshBefore` seconds before `exp`); sent as `?token=`. */
  token: string | (() => string | Promise<string>);
  /** WebSocket constructor (default `globalThis.WebSocket`): the browser's, Node's, or any
   * with the same `onopen`/`onmessage`/`onclose`/`onerror`, `readyState`, `send`, `close`. */
  WebSocket?: new (url: string) => WebSocketLike;
  /** Used to tell why a handshake was refused (default `globalThis.fetch`; null: never). */
  fetch?: typeof fetch | null;
  /** Reconnection delays in ms: random() * min(cap, base * 2^(attempt-1)). */
  backoff?: { base?: number; cap?: number };
  /** Seconds before the token's `exp` to send a `refresh` with a new token (default 60). */
  refreshBefore?: number;
  /** Ms between ack flushes; at most one ack per room per interval (default 1000). */
  ackInterval?: number;
  /** Ms of silence after which a `ping` is sent, and after which, again silent, the connection
   * is dropped and reopened (default: the welcome's `heartbeat`; 0: never). */
  pingInterval?: number;
  /** Random source in [0, 1) for the jitter (default Math.random). */
  random?: () => number;
  /** Coalescing, sent as `?batch=` on every (re)connect: the longest (ms, an integer from 0 to
   * 1000; else TypeError) the server may hold a frame to send it in one message with others;
   * 0 (default): only frames ready at the same moment, never delayed. null: not asked, one
   * frame per message. Either way each message is split on "\n" into its frames (a server
   * that does not coalesce, welcome without `batch`, sends one per message). Replaces any
   * `batch` in the URL. */
  batch?: number | null;
}

export interface SubscribeOptions {
  /** The first subscribe starts after this seq; later ones after `lastSeq`. Omitted: the
   * server resumes from the user's acknowledged seq, else from the head; in a room of the
   * bridge's feed (without `snapshot`), after the feed's `head` of the room. */
  since?: number;
  /** Each event once, seq strictly increasing. */
  onEvent?(event: BridgeEvent): void;
  /** `fatal: true`: the subscription ended (forbidden, not_found, cursor_expired,
   * membership_revoked, room_deleted, bad_request); subscribe again if appropriate (after
   * cursor_expired, without `since`). `fatal: false`: informative, it goes on. */
  onError?(error: BridgeError): void;
  /** The first subscribe asks for the room's `snapshot` most recent messages (1 to the
   * server's PGBRIDGE_SNAPSHOT_MAX, default 1000; not with `since`): onSnapshot gets them
   * after the first onSubscribed, then onEvent every event after them. Resubscribes (after a
   * reconnect) resume with `since` = `lastSeq` instead: nothing is lost or repeated. */
  snapshot?: number;
  /** With `snapshot`: the `snapshot` frame, once. */
  onSnapshot?(snapshot: Snapshot): void;
  /** The `subscribed` frame of every (re)subscribe. */
  onSubscribed?(frame: SubscribedFrame): void;
  /** Ack each delivered event (batched; default true). */
  autoAck?: boolean;
  /** Also follow the members' presence and typing: sends `"presence": true` with every
   * (re)subscribe (default false: the field is not sent, and none of this arrives). */
  presence?: boolean;
  /** With `presence`: each `presence` frame, once in `members`: after each `subscribed`, one
   * per member (the snapshot, which replaces `members`), then one per change. */
  onPresence?(presence: Presence): void;
  /** With `presence`: each typing signal received. */
  onTyping?(signal: TypingSignal): void;
  /** With `presence`: `typists()` changed (someone started typing, their signal expired, or
   * they went offline); called with the new list. */
  onTypists?(users: string[]): void;
  /** With `presence`: ms a member counts as typing after their last signal (default 5000). */
  typingTimeout?: number;
}

export declare class Subscription {
  readonly room: string;
  /** The last seq held: the last event delivered, else `since`, else `from` of the first
   * `subscribed`; null before that. Resubscribes resume after it. */
  readonly lastSeq: number | null;
  /** False once ended (unsubscribe(), a fatal error, or the bridge closed). */
  readonly active: boolean;
  /** Subscribed with `presence: true`. */
  readonly presence: boolean;
  /** With `presence`: user id -> their last presence received. Emptied when a (re)subscribe is
   * confirmed (before onSubscribed), then filled by the snapshot that follows; as last known
   * while reconnecting; no longer updated once ended. Empty without `presence`. */
  readonly members: ReadonlyMap<string, Presence>;
  /** Acknowledge up to `seq` (<= lastSeq, else RangeError); batched. */
  ack(seq: number): void;
  /** Signal that the user is typing in the room (with or without `presence`); call it on every
   * keystroke: at most one signal per second is sent. False: not sent (throttled, the room not
   * yet subscribed on the current connection, or ended). */
  typing(): boolean;
  /** With `presence`: users whose last typing signal arrived less than `typingTimeout` ms ago,
   * in the order they started typing. */
  typists(): string[];
  /** Stop following the room; pending acks are sent first. Idempotent. */
  unsubscribe(): void;
  /** Optimistic send (docs/howto/optimistic-send.md): resolves with the INSERT event of the
   * row with this `id` in this room (call it before sending the row; an event that arrived
   * just before the call, among the room's last 256 INSERTs since the first pending(), counts
   * too; a row already in the room's snapshot resolves it with `type: "snapshot"` and the
   * snapshot's `seq`, at or after the row's, and no `ts`). Rejects with a
   * {@link PendingError}. Twice for one id: the same promise. TypeError for an empty id or a
   * bad timeout. */
  pending(id: string, options?: PendingOptions): Promise<EventOf<"messages"> | SnapshotInsert>;
  /** Give up on a pending id (the request that was to write it failed): its promise rejects
   * with code `failed` and `cause` = `reason`. Returns whether the id was pending. */
  fail(id: string, reason?: unknown): boolean;
}

export interface PendingOptions {
  /** Ms to wait for the event before rejecting with code `timeout` (default 30000;
   * Infinity: never). */
  timeout?: number;
}

/** Why an optimistic row was not confirmed. */
export interface PendingError extends Error {
  /** `timeout`, `failed` (`fail()`), `unsubscribed` (the subscription ended) or `closed`. */
  code: "timeout" | "failed" | "unsubscribed" | "closed";
  room: string;
  id: string;
}

/** A room of the feed: how far it goes and how far the user has read it. */
export interface FeedRoom {
  /** The room's latest seq known (0: no event yet): from the `feed` answer, then each event
   * of the room (through the feed or a subscription). */
  readonly head: number;
  /** The seq the user acknowledged (`sync_state`; 0: never): from the answer, then each ack
   * (`feed.ack()`, or a subscription's). */
  readonly acked: number;
  /** Messages of other users after `acked`: the answer's count (at most 100, which means
   * "100 or more": show "99+"), + 1 for each messages INSERT of another user (not
   * soft-deleted) since, - 1 when one of those is deleted or soft-deleted or an ack reaches
   * it; 0 once an ack reaches `head`. */
  readonly unread: number;
}

export interface FeedOptions {
  /** Each answer to `feed` (the first, and one per reconnect): `feed.rooms`, replaced. */
  onFeed?(rooms: ReadonlyMap<string, FeedRoom>): void;
  /** Each event of a room no Subscription of this bridge holds, once, in order per room
   * (after onJoin and onUpdate of it). */
  onEvent?(event: BridgeEvent): void;
  /** A room not in `rooms` got an event (a room the user joined: usually its
   * `channel_members` INSERT): it is added with `acked` 0, before onUpdate and onEvent. */
  onJoin?(room: string, event: BridgeEvent): void;
  /** The room is no longer followed and was removed from `rooms`: `membership_revoked`,
   * `room_deleted`, or `cursor_expired` (its events are gone from the log; a reconnect's
   * answer brings it back). */
  onLeave?(room: string, reason: string): void;
  /** A room's entry changed (an event, an ack, a join; not with onFeed, which replaces all). */
  onUpdate?(room: string, entry: FeedRoom): void;
  /** The `feed` refused (`feed: true`; `fatal`: the feed ended, else sent again after a
   * backoff delay), or an `error` frame about a room only the feed follows (not fatal). */
  onError?(error: BridgeError): void;
}

/** "One feed per user" (PROTOCOL.md): every room of the user, with `head`, `acked` and
 * `unread`, kept current, then the rooms' events; re-sent on every reconnect. */
export declare class Feed {
  /** room -> its entry (frozen; replaced on each change). Empty before the first answer; as
   * last known while reconnecting; replaced by each answer. */
  readonly rooms: ReadonlyMap<string, FeedRoom>;
  /** False once ended (a fatal refusal, or the bridge closed). */
  readonly active: boolean;
  /** Acknowledge a room up to `seq` (0 to its `head`, else RangeError): `acked` at once,
   * `unread` 0 when `seq` reaches `head`; sent batched (`ackInterval`). At or below `acked`,
   * or once the feed ended: nothing. */
  ack(room: string, seq: number): void;
}

export declare class PgBridge extends EventTarget {
  /** Connects at once. `url`: ws:, wss:, http:, https:, or relative in a browser. TypeError
   * for an unusable `url`, a missing `token` or WebSocket, or a bad `batch`. */
  constructor(url: string, options: PgBridgeOptions);
  readonly url: string;
  readonly state: BridgeState;
  /** The correlation id of the last welcomed connection (`welcome`'s `correlation_id`: its
   * lines in the server's log carry it; name it when reporting a problem). Kept after the
   * connection ends, until the next welcome; null before the first or from a server that does
   * not send it. */
  readonly correlationId: string | null;
  /** The `user` of the last welcome (null before the first). */
  readonly user: string | null;
  /** Follow every room of the user (PROTOCOL.md, "One feed per user"), across reconnects.
   * Events of a room a Subscription holds go to that subscription only; a subscribe to a room
   * of the feed without `since` nor `snapshot` resumes after the feed's `head` of it (nothing
   * twice). Error if this bridge already has an active feed or is closed. */
  feed(options?: FeedOptions): Feed;
  /** Throws TypeError for a bad room id, since, snapshot, presence or typingTimeout, Error if already
   * subscribed or closed. */
  subscribe(room: string, options?: SubscribeOptions): Subscription;
  /** Sends pending acks, closes with 1000, clears every timer; never reconnects. */
  close(): void;
  addEventListener(type: "state", listener: (e: CustomEvent<StateDetail>) => void,
    options?: ListenerOptions): void;
  addEventListener(type: "error", listener: (e: CustomEvent<BridgeError>) => void,
    options?: ListenerOptions): void;
  addEventListener(type: "reconnect", listener: (e: CustomEvent<{ attempt: number }>) => void,
    options?: ListenerOptions): void;
  addEventListener(type: string, listener: ((e: Event) => void) | { handleEvent(e: Event): void }
    | null, options?: ListenerOptions): void;
}

/** The `exp` claim (seconds since 1970) of a JWT, unverified; null if unreadable. */
export declare function tokenExpiry(token: string): number | null;
