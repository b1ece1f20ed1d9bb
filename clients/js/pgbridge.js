// pgbridge.js: the browser/Node (>= 20) client of the pgbridge WebSocket protocol
// (docs/PROTOCOL.md). One dependency-free ES module, no build step; types in pgbridge.d.ts.
// Resumes rooms after drops with `since`, delivers each seq once and in order, reconnects with
// capped jittered backoff (each attempt that fails says why: `connect_failed` and its cause),
// renews the token, batches acks, stops on refusals a retry can't fix.
// Asks the server to coalesce frames (`batch`); every message is split into its frames.
// Opt-in per room: the members' presence (rebuilt from each new snapshot) and typing signals.
// One feed per user: every room of the user with its unread count, kept current, then live.

/** Close codes a retry cannot fix (PROTOCOL.md, "Close codes"), with the error code reported. */
const FATAL_CLOSE = { 1007: "invalid_payload", 1008: "policy_violation",
  1009: "message_too_big", 4003: "user_deleted" };
const RETRIED_SUBSCRIBE = new Set(["rate_limited", "internal"]); // refusals that pass
const ROOM = /^[A-Za-z0-9_-]{1,26}$/;
const STABLE_MS = 5000; // open and welcomed this long: the backoff starts again from `base`
const PROBE_TIMEOUT_MS = 10000;
const MAX_TIMER_MS = 2 ** 31 - 1;
const TYPING_INTERVAL_MS = 1000; // sub.typing() sends at most one signal per room this often
const TYPING_TIMEOUT_MS = 5000; // default: a member types for this long after their last signal
const MAX_BATCH_MS = 1000; // the longest `batch` a server accepts (PROTOCOL.md)

/** The `exp` of a JWT (seconds since 1970), read without verification; null if unreadable.
 * @param {string} token @returns {number | null} */
export function tokenExpiry(token) {
  try {
    const b64 = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4))).exp;
    return typeof exp === "number" && Number.isFinite(exp) ? exp : null;
  } catch {
    return null;
  }
}

function call(fn, ...args) { // a throwing application callback must not break the client
  if (typeof fn !== "function") return;
  try { fn(...args); } catch (err) { // browsers: reported; Node: uncaught, as from a listener
    if (typeof globalThis.reportError === "function") globalThis.reportError(err);
    else queueMicrotask(() => { throw err; });
  }
}

function resolveUrl(url) {
  const u = new URL(String(url), globalThis.location?.href); // relative ("/ws"): browsers only
  if (u.protocol.startsWith("http")) u.protocol = u.protocol.replace("http", "ws");
  if (u.protocol !== "ws:" && u.protocol !== "wss:") {
    throw new TypeError(`pgbridge: not a ws:, wss:, http: or https: URL: ${url}`);
  }
  u.hash = "";
  return u.href;
}

// Why a connection attempt failed, from the error a transport gives (Node's `ws` package: an
// Error with a system `code`; Node's fetch: a TypeError whose `cause` has one). Browsers give
// nothing: the handshake probe (fetch) tells "http" (with the status) from "unreachable".
const NETWORK_CAUSES = { ECONNREFUSED: "refused", ENOTFOUND: "unreachable",
  EAI_AGAIN: "unreachable", EAI_FAIL: "unreachable", EHOSTUNREACH: "unreachable",
  ENETUNREACH: "unreachable", EHOSTDOWN: "unreachable", ENETDOWN: "unreachable",
  EADDRNOTAVAIL: "unreachable", ETIMEDOUT: "timeout", UND_ERR_CONNECT_TIMEOUT: "timeout",
  ECONNRESET: "reset", EPIPE: "reset", UND_ERR_SOCKET: "reset", EPROTO: "tls" };
const TLS_CODE = /CERT|^ERR_TLS_|^ERR_SSL_|^SSL_|^UNABLE_TO_/;

/** The system error code in a transport's error (or its `cause`, or the first of an
 * AggregateError's), if any. */
function errorCode(err, depth = 0) {
  if (err === null || typeof err !== "object" || depth > 3) return null;
  if (typeof err.code === "string" && err.code) return err.code;
  return errorCode(err.error ?? err.cause ?? err.errors?.[0], depth + 1);
}

/** `{cause, errno?}` when the error names a network or TLS failure, else null. */
function networkCause(err) {
  const errno = errorCode(err);
  if (!errno) return null;
  const cause = NETWORK_CAUSES[errno] ?? (TLS_CODE.test(errno) ? "tls" : null);
  return cause && { cause, errno };
}

/** The HTTP status of a refused upgrade as Node's `ws` reports it ("Unexpected server
 * response: 503"), else 0. */
function responseStatus(err) {
  const text = String(err?.error?.message ?? err?.message ?? "");
  const m = /Unexpected server response: (\d{3})/.exec(text);
  return m ? Number(m[1]) : 0;
}

function describeCause({ cause, errno, status }) {
  const what = { refused: "connection refused", unreachable: "host unreachable",
    timeout: "timed out", reset: "connection reset", tls: "TLS failed",
    http: status ? `HTTP ${status} instead of an upgrade`
      : "the server answered without an upgrade (its answer is hidden from this origin)",
    unknown: "handshake failed" }[cause] ?? cause;
  return errno ? `${what} (${errno})` : what;
}

function paramName(param) { // as the server decodes it
  try { return decodeURIComponent(param.split("=")[0].replace(/\+/g, " ")); } catch { return null; }
}

/** The URL of a connection attempt: `url` with `token=` and, unless `batch` is null,
 * `batch=` (which replaces any `batch` of `url`: a repeated one is refused with HTTP 400). */
function withToken(url, token, batch, http = false) {
  const u = new URL(url);
  if (http) u.protocol = u.protocol.replace("ws", "http");
  const params = u.search ? u.search.slice(1).split("&") : [];
  const kept = batch === null ? params : params.filter((p) => paramName(p) !== "batch");
  kept.push("token=" + encodeURIComponent(token));
  if (batch !== null) kept.push(`batch=${batch}`);
  u.search = kept.join("&");
  return u.href;
}

/** A read-only view of a Map (`sub.members`): what a ReadonlyMap offers, reads only. */
class MapView {
  #map;
  constructor(map) { this.#map = map; }
  get size() { return this.#map.size; }
  get(key) { return this.#map.get(key); }
  has(key) { return this.#map.has(key); }
  keys() { return this.#map.keys(); }
  values() { return this.#map.values(); }
  entries() { return this.#map.entries(); }
  forEach(fn, thisArg) { this.#map.forEach((value, key) => fn.call(thisArg, value, key, this)); }
  [Symbol.iterator]() { return this.#map.entries(); }
  get [Symbol.toStringTag]() { return "MapView"; }
}

/** One room followed by a {@link PgBridge}; made by `bridge.subscribe(room, options)`. */
export class Subscription {
  constructor(bridge, room, options) {
    /** The room (`channels.id`). */
    this.room = room;
    /** The seq up to which the room is held: the last event delivered, else the `since`
     * option, else `from` of the first `subscribed`; null before that. Resumes start after it. */
    this.lastSeq = options.since ?? null;
    /** False once ended: unsubscribe(), a fatal error, or the bridge closed. */
    this.active = true;
    /** True if subscribed with `presence: true`: every (re)subscribe asks for presence. */
    this.presence = options.presence === true;
    const members = new Map(); // user -> frozen presence; emptied by each `subscribed`
    /** With `presence`: user id -> the member's last presence received (read-only). Emptied
     * when a (re)subscribe is confirmed, before onSubscribed, then filled by the snapshot that
     * follows; as last known while reconnecting; no longer updated once ended. */
    this.members = new MapView(members);
    Object.assign(this, { _bridge: bridge, _options: options, _autoAck: options.autoAck !== false,
      _ref: null, // ref of the subscribe sent on the current connection, if any
      _confirmed: false, // `subscribed` received on the current connection
      _snapshotDue: options.snapshot != null, // asked for, not received yet: ask again
      _retries: 0, _retryTimer: null, _ackPending: -1, _acked: -1,
      _members: members,
      _typists: new Map(), // user -> Date.now() of their last typing signal, until it expires
      _typingTimeout: options.typingTimeout ?? TYPING_TIMEOUT_MS,
      _typingTimer: null, // expires the oldest typist
      _typingSent: -Infinity }); // Date.now() of the last typing signal sent
  }

  /** Acknowledge the room's events up to `seq` (at most `lastSeq`, else RangeError); sent
   * batched, at most one ack per room per `ackInterval`. Only needed with `autoAck: false`.
   * @param {number} seq */
  ack(seq) {
    if (!Number.isSafeInteger(seq) || seq < 0 || this.lastSeq === null || seq > this.lastSeq) {
      throw new RangeError(`pgbridge: cannot ack ${seq} in ${this.room} (held: ${this.lastSeq})`);
    }
    this._bridge._ack(this, seq);
  }

  /** Tell the room the user is typing (with or without `presence`). Throttled: at most one
   * signal per second, so it may be called on every keystroke; not sent (false) before the
   * room is subscribed on the current connection, nor once ended. @returns {boolean} sent */
  typing() { return this._bridge._typing(this); }

  /** With `presence`: the users whose last typing signal arrived less than `typingTimeout` ms
   * ago, in the order they started typing. @returns {string[]} */
  typists() {
    const now = Date.now();
    return [...this._typists].filter(([, t]) => now - t < this._typingTimeout).map(([u]) => u);
  }

  /** Stop following the room (a pending ack is sent first). Idempotent. */
  unsubscribe() { this._bridge._unsubscribe(this); }

  /** Optimistic send (docs/howto/optimistic-send.md): wait for the INSERT event of the row
   * with this `id` (the client-generated ULID of `messages.id`) in this room. Call it before
   * sending the row, show the row as pending, replace it with the event when this resolves.
   * Resolves with the event (its `seq` is the one `pgbridge_receipt()` gave the writer), or,
   * for a row already in the room's snapshot, with `{type: "snapshot", room, seq, table:
   * "messages", op: "INSERT", id, data}` (`seq`: the snapshot's, at or after the row's);
   * rejects with an Error whose `code` is `timeout` (none within `timeout` ms, default 30000;
   * Infinity: never), `failed` (`fail(id)` was called; `cause`: its reason), `unsubscribed`
   * or `closed`. Twice for the same id: the same promise. TypeError for an empty id or a bad
   * timeout. @param {string} id @param {{timeout?: number}} [options]
   * @returns {Promise<object>} */
  pending(id, options = {}) { return awaitInsert(this, id, options); }

  /** Give up on a pending id (e.g. the request that should have written it failed): its
   * promise rejects with code `failed` and `cause` = `reason`. @param {string} id
   * @param {unknown} [reason] @returns {boolean} whether the id was pending */
  fail(id, reason) {
    return settleInsert(this, id, null, optimisticError("failed", this.room, id,
      `pgbridge: the write of ${id} failed`, reason));
  }
}

// --- optimistic sends ----------------------------------------------------------------------
// A subscription's pending ids and, once pending() was first called, the ids of its last
// RECENT_INSERTS INSERT events, so that an id asked for just after its event arrived (the
// event can beat the response of the request that wrote it) still resolves.
const RECENT_INSERTS = 256;
const PENDING_TIMEOUT_MS = 30000;

function optimisticError(code, room, id, message, cause) {
  return Object.assign(new Error(message, cause === undefined ? undefined : { cause }),
    { code, room, id });
}

function awaitInsert(sub, id, options) {
  if (typeof id !== "string" || !id) throw new TypeError("pgbridge: pending() needs a row id");
  const timeout = options.timeout ?? PENDING_TIMEOUT_MS;
  if (!(timeout === Infinity || (Number.isFinite(timeout) && timeout >= 0))) {
    throw new TypeError(`pgbridge: pending timeout must be ms >= 0 or Infinity, not ${timeout}`);
  }
  const state = (sub._optimistic ??= { waiting: new Map(), recent: new Map() });
  const seen = state.recent.get(id);
  if (seen) return Promise.resolve(seen);
  const waiting = state.waiting.get(id);
  if (waiting) return waiting.promise;
  if (!sub.active) {
    return Promise.reject(optimisticError("unsubscribed", sub.room, id,
      `pgbridge: ${sub.room} is no longer followed`));
  }
  const entry = { timer: null };
  entry.promise = new Promise((resolve, reject) => Object.assign(entry, { resolve, reject }));
  if (timeout !== Infinity) {
    entry.timer = setTimeout(() => settleInsert(sub, id, null, optimisticError("timeout",
      sub.room, id, `pgbridge: no INSERT of ${id} in ${sub.room} within ${timeout} ms`)),
    Math.min(timeout, MAX_TIMER_MS));
  }
  state.waiting.set(id, entry);
  return entry.promise;
}

function settleInsert(sub, id, event, error) {
  const entry = sub._optimistic?.waiting.get(id);
  if (!entry) return false;
  sub._optimistic.waiting.delete(id);
  clearTimeout(entry.timer);
  if (error) entry.reject(error);
  else entry.resolve(event);
  return true;
}

function confirmInsert(sub, event) { // every event delivered to the subscription
  const state = sub._optimistic;
  if (!state || event.op !== "INSERT" || typeof event.id !== "string") return;
  state.recent.set(event.id, event);
  if (state.recent.size > RECENT_INSERTS) state.recent.delete(state.recent.keys().next().value);
  settleInsert(sub, event.id, event, null);
}

function failAllInserts(sub, code, message) { // the subscription ended
  for (const id of [...(sub._optimistic?.waiting.keys() ?? [])]) {
    settleInsert(sub, id, null, optimisticError(code, sub.room, id, message));
  }
}

// --- the feed ------------------------------------------------------------------------------
// "One feed per user" (PROTOCOL.md): every room of the user, with how far the user has read
// it, then the rooms' events. A room a Subscription holds on the connection gets its events
// through that subscription (the feed's entry still follows them); the others through the feed.

/** Whether an event is a message another user wrote: what `unread` counts (PROTOCOL.md). */
function unreadBy(event, user) {
  const row = event.data;
  return event.table === "messages" && event.op === "INSERT" && row !== null
    && typeof row === "object" && row.user_id !== user && !row.deleted_at;
}

/** Whether an event removes a message: deleted, or soft-deleted (`deleted_at` set). */
function removes(event) {
  return event.table === "messages" && (event.op === "DELETE"
    || (event.op === "UPDATE" && Boolean(event.data?.deleted_at)));
}

/** The user's rooms followed by a {@link PgBridge}; made by `bridge.feed(options)`. */
export class Feed {
  constructor(bridge, options) {
    const rooms = new Map(); // room -> frozen {head, acked, unread}
    /** room -> `{head, acked, unread}` (read-only, each entry frozen and replaced on change):
     * the last `feed` answer, kept current by the rooms' events (`head`; `unread` + 1 for each
     * message another user wrote, - 1 when one of those is deleted), acks (`acked`; `unread`
     * less the messages it counted up to there, 0 once `acked` reaches `head`),
     * joins (added, `acked` 0) and leaves (removed). Replaced by the answer to each re-sent
     * `feed` after a reconnect; empty before the first; as last known while reconnecting. */
    this.rooms = new MapView(rooms);
    /** False once ended: a fatal refusal, or the bridge closed. */
    this.active = true;
    Object.assign(this, { _bridge: bridge, _options: options, _rooms: rooms,
      _ref: null, // ref of the `feed` sent on the current connection, if any
      _confirmed: false, // its answer received
      _retries: 0, _retryTimer: null,
      _acks: new Map(), // room -> seq to send (batched, as a subscription's)
      _counted: new Map() }); // room -> Map(message id -> seq) counted in unread since the answer
  }

  /** Acknowledge a room's events up to `seq` (0 to the room's `head`, else RangeError); sent
   * batched, at most one ack per room per `ackInterval`. Sets the room's `acked` at once, and
   * its `unread` to 0 when `seq` reaches `head`. An ack at or below `acked`, or once the feed
   * ended, changes nothing. @param {string} room @param {number} seq */
  ack(room, seq) {
    if (!this.active) return;
    const entry = this._rooms.get(room);
    if (!entry || !Number.isSafeInteger(seq) || seq < 0 || seq > entry.head) {
      throw new RangeError(`pgbridge: cannot ack ${seq} in ${room} (feed head: `
        + `${entry?.head ?? "not a room of the feed"})`);
    }
    this._bridge._feedAck(room, seq, true);
  }
}

/**
 * A connection to a pgbridge daemon that follows rooms across reconnects. Connects at once.
 *
 * Events (`addEventListener`; the CustomEvent's `detail`):
 * - `state` `{state, code, reason, attempt, delay}`: `state` is the new `bridge.state`;
 *   `code`/`reason` those of the close that caused it (else null); `attempt` the reconnection
 *   attempts since the last connection that stayed open 5 s (1 = first retry); `delay` the ms
 *   before the next attempt when "reconnecting", else null; with "open", also
 *   `correlationId` (the new connection's, as `bridge.correlationId`).
 * - `error` `{code, message, room?, feed?, fatal, closeCode?, status?, cause?, errno?,
 *   attempt?}`: `fatal` without a room nor `feed`: the bridge gave up and is "closed"
 *   (`unauthorized`, `forbidden_origin`, `user_deleted` (4003), `policy_violation` (1008),
 *   `message_too_big` (1009), `invalid_payload` (1007), `connect_failed` with `cause`
 *   "websocket": the WebSocket constructor threw); `fatal` with a room: that subscription ended
 *   (also its onError); with `feed: true`: the refusal of the feed (also its onError), ended
 *   when `fatal`. Not fatal: informative (an `error` frame, `token_unavailable`, ...), the
 *   bridge carries on; among them `connect_failed`, once per connection attempt that failed
 *   before the WebSocket opened (a retry follows, after the backoff delay of the `state`
 *   event): `attempt` (0: the first connection, n: the n-th retry), `cause` "refused",
 *   "unreachable" (no route, DNS; in a browser: any network failure), "timeout", "reset",
 *   "tls", "http" (the server answered `status` instead of upgrading; no `status`: an answer
 *   the browser hides from a page of another origin) or "unknown"; `errno` the system error
 *   code when the transport gives one (Node's `ws`).
 * - `reconnect` `{attempt}`: each successful re-open after the first.
 */
export class PgBridge extends EventTarget {
  /**
   * @param {string} url "ws://host:port/ws", "wss://…/ws" (http(s) accepted), or relative
   *   ("/ws") in a browser. TypeError if unusable.
   * @param {object} options `token` (string or function returning one, maybe async; called
   *   before each connection attempt and for refreshes), `WebSocket`, `fetch` (null: never
   *   probe), `backoff: {base, cap}` (ms), `refreshBefore` (s), `ackInterval` (ms),
   *   `pingInterval` (ms; default the welcome's heartbeat; 0: none), `random`, `batch` (ms,
   *   integer 0 to 1000, default 0: the longest the server may hold a frame to send it with
   *   others; null: not asked, one frame per message). See pgbridge.d.ts.
   */
  constructor(url, options = {}) {
    super();
    this.url = resolveUrl(url);
    const { token, backoff = {}, batch = 0 } = options;
    const WS = options.WebSocket ?? globalThis.WebSocket;
    if (typeof token !== "string" && typeof token !== "function") {
      throw new TypeError("pgbridge: option `token` must be a string or a function");
    } else if (batch !== null && !(Number.isInteger(batch) && batch >= 0
      && batch <= MAX_BATCH_MS)) {
      throw new TypeError(`pgbridge: option \`batch\` must be an integer from 0 to ${MAX_BATCH_MS} `
        + `(ms) or null, not ${batch}`);
    } else if (typeof WS !== "function") { // Node 20: or run with --experimental-websocket
      throw new TypeError("pgbridge: no global WebSocket: pass option `WebSocket`");
    }
    /** @type {"connecting" | "open" | "reconnecting" | "closed"} */
    this.state = "connecting";
    /** The correlation id of the last welcomed connection (its `welcome`'s `correlation_id`,
     * the id of its lines in the server's log: name it when reporting a problem), kept after
     * it ends until the next welcome; null before the first, or from a server without it.
     * @type {string | null} */
    this.correlationId = null;
    /** The user of the last welcomed connection (its `welcome`'s `user`); null before the
     * first. The feed counts as unread the messages of every other user. @type {string | null} */
    this.user = null;
    Object.assign(this, { _tokenSource: token, _WebSocket: WS, _batch: batch,
      _fetch: options.fetch === undefined ? globalThis.fetch?.bind(globalThis) ?? null
        : options.fetch || null,
      _base: backoff.base ?? 250, _cap: backoff.cap ?? 10000,
      _refreshBefore: options.refreshBefore ?? 60, _ackInterval: options.ackInterval ?? 1000,
      _pingInterval: options.pingInterval, _random: options.random ?? Math.random,
      _subs: new Map(), // room -> active Subscription
      _feed: null, // the Feed, while active
      _refs: new Map(), // ref -> {kind, sub?} of requests sent on the current connection
      _nextRef: 0, _rx: 0,
      _gen: 0, // bumped by each connection attempt and by close(): stale async work returns
      _ws: null, _opened: false, _welcomed: false, _everWelcomed: false,
      _attempt: 0, _authRetried: false, _token: null, _exp: null, _ackFactor: 1, _probe: null,
      _timers: { reconnect: null, stable: null, ping: null, refresh: null, ack: null } });
    this._connect();
  }

  /**
   * Follow a room; sent now if open, else on the next welcome. A room of the feed: taken over
   * from it (its events come here only until unsubscribe() gives it back), and without
   * `since` nor `snapshot` resumed after the feed's `head` of it. TypeError for a bad room id
   * or `since`; Error if this bridge already follows the room or is closed.
   * @param {string} room a `channels.id` (1 to 26 of A-Z a-z 0-9 _ -)
   * @param {object} [options] `since` (integer), `onEvent(event)`, `onError(error)`,
   *   `onSubscribed(frame)`, `autoAck` (default true); `snapshot` (N, first subscribe only),
   *   `onSnapshot(snapshot)`; `presence` (boolean, default false),
   *   `onPresence(presence)`, `onTyping(signal)`, `onTypists(users)`, `typingTimeout` (ms,
   *   default 5000). See pgbridge.d.ts.
   * @returns {Subscription}
   */
  subscribe(room, options = {}) {
    if (this.state === "closed") throw new Error("pgbridge: the bridge is closed");
    const { since, presence, typingTimeout, snapshot } = options;
    if (typeof room !== "string" || !ROOM.test(room)) {
      throw new TypeError(`pgbridge: not a room id: ${room}`);
    } else if (since != null && !(Number.isSafeInteger(since) && since >= 0)) {
      throw new TypeError(`pgbridge: since must be an integer >= 0, not ${since}`);
    } else if (snapshot != null && !(Number.isSafeInteger(snapshot) && snapshot >= 1
      && since == null)) {
      throw new TypeError(`pgbridge: snapshot must be an integer >= 1 without since, not ${snapshot}`);
    } else if (presence != null && typeof presence !== "boolean") {
      throw new TypeError(`pgbridge: presence must be a boolean, not ${presence}`);
    } else if (typingTimeout != null && !(typeof typingTimeout === "number"
      && typingTimeout > 0 && typingTimeout <= MAX_TIMER_MS)) {
      throw new TypeError(`pgbridge: typingTimeout must be ms > 0, not ${typingTimeout}`);
    }
    if (this._subs.has(room)) throw new Error(`pgbridge: already subscribed to ${room}`);
    const held = this._feed?._rooms.get(room);
    if (held && since == null && snapshot == null) { // the last seq the feed delivered
      options = { ...options, since: held.head };
    }
    const sub = new Subscription(this, room, options);
    this._subs.set(room, sub);
    this._sendSubscribe(sub);
    return sub;
  }

  /**
   * Follow every room of the user, now and later (PROTOCOL.md, "One feed per user"); sent now
   * if open, else on the next welcome, and again on every reconnect (each answer replaces
   * `feed.rooms`). Events of a room held by a Subscription of this bridge go to that
   * subscription only (a subscribe to a feed room without `since` nor `snapshot` resumes after
   * the feed's `head` of the room: nothing twice); the others to `onEvent`. Error if this
   * bridge already has an active feed or is closed.
   * @param {object} [options] `onFeed(rooms)` (each answer: the new `feed.rooms`),
   *   `onEvent(event)`, `onJoin(room, event)` (a room the user joined: its first event,
   *   before onEvent of it), `onLeave(room, reason)` (`membership_revoked`, `room_deleted`,
   *   `cursor_expired`: the room is no longer followed), `onUpdate(room, entry)` (a room's
   *   head, acked or unread changed), `onError(error)`. See pgbridge.d.ts.
   * @returns {Feed}
   */
  feed(options = {}) {
    if (this.state === "closed") throw new Error("pgbridge: the bridge is closed");
    if (this._feed) throw new Error("pgbridge: this bridge already has a feed");
    const feed = (this._feed = new Feed(this, options));
    this._sendFeed();
    return feed;
  }

  /** Send pending acks, close with 1000, end every subscription, clear every timer; never
   * reconnects. Idempotent. */
  close() {
    if (this.state === "closed") return;
    this._flushAcks();
    const ws = this._ws;
    this._shutdown();
    try { ws?.close(1000, "client closed"); } catch { /* already closing */ }
    this._emit("state", { state: "closed", code: 1000, reason: "client closed",
      attempt: this._attempt, delay: null });
  }

  // --- connection -------------------------------------------------------------------------

  async _getToken() { // a non-empty string, or throws
    const src = this._tokenSource;
    const token = typeof src === "function" ? await src() : src;
    if (typeof token !== "string" || !token) throw new TypeError("not a non-empty string");
    return token;
  }

  async _connect() {
    const gen = ++this._gen;
    const token = await this._getToken().catch((err) => {
      if (gen !== this._gen) return;
      this._error({ code: "token_unavailable", message: `no token: ${err?.message ?? err}` });
      this._retry(null, "no token");
    });
    if (gen !== this._gen || token === undefined) return; // closed meanwhile, or retrying
    Object.assign(this, { _token: token, _exp: tokenExpiry(token), _opened: false });
    let ws;
    try {
      ws = this._ws = new this._WebSocket(withToken(this.url, token, this._batch));
    } catch (err) {
      const message = String(err?.message ?? err);
      return this._fail({ code: "connect_failed", cause: "websocket", message }, null, null);
    }
    ws.onopen = () => { if (ws === this._ws) this._opened = true; };
    ws.onmessage = (e) => { if (ws === this._ws) this._onMessage(ws, e.data); };
    ws.onclose = (e) => { if (ws === this._ws) this._onClose(e.code, e.reason); };
    // A failed handshake is close 1006 before open, after `error` (which, from Node's `ws`,
    // says why); Node 20's WebSocket fires only `error`.
    ws.onerror = (e) => { if (ws === this._ws && !this._opened) this._onClose(1006, "", e); };
  }

  /** @param {object} [failure] the transport's `error` event of a failed handshake */
  _onClose(code, reason, failure) {
    const opened = this._opened;
    this._detach();
    if (FATAL_CLOSE[code]) {
      return this._fail({ code: FATAL_CLOSE[code], closeCode: code,
        message: `closed by the server with ${code}${reason ? `: ${reason}` : ""}` }, code, reason);
    }
    if (code === 4001 && typeof this._tokenSource !== "function") {
      return this._fail({ code: "unauthorized", closeCode: code,
        message: "the token expired (4001) and option `token` is a fixed string" }, code, reason);
    }
    if (code === 4001) return this._retry(code, reason, { now: this._attempt === 0 });
    if (!opened) {
      const known = networkCause(failure);
      if (!known && this._fetch) return this._probeHandshake(code, reason, failure);
      const status = responseStatus(failure);
      this._connectFailed(known ?? (status ? { cause: "http", status } : { cause: "unknown" }));
    }
    this._retry(code, reason);
  }

  /** A connection attempt failed: the `error` event `connect_failed` (not fatal: a retry
   * follows), once per failed attempt. */
  _connectFailed(found) {
    this._error({ code: "connect_failed", ...found, attempt: this._attempt,
      message: `cannot connect to ${this.url}: ${describeCause(found)}; retrying` });
  }

  /** A browser cannot see why a handshake was refused: ask the same URL without upgrade
   * headers (426: the token is fine; 401, 403, 429, 503 as in PROTOCOL.md). */
  async _probeHandshake(code, reason, failure) {
    const gen = this._gen;
    const ctl = (this._probe = new AbortController());
    let timedOut = false;
    const timer = setTimeout(() => { timedOut = true; ctl.abort(); }, PROBE_TIMEOUT_MS);
    let status = 0;
    let retryAfter = NaN;
    let rejected = null;
    let hidden = false; // an answer the browser hides from this page (another origin)
    const url = withToken(this.url, this._token, this._batch, true);
    const init = { cache: "no-store", credentials: "omit", signal: ctl.signal };
    try {
      const res = await this._fetch(url, init);
      status = res.status;
      retryAfter = Number.parseFloat(res.headers?.get?.("Retry-After"));
      res.body?.cancel?.().catch?.(() => {});
    } catch (err) { rejected = err; } // network, CORS, abort: plain backoff
    if (rejected && !timedOut && !networkCause(rejected) && gen === this._gen) {
      // A page of another origin cannot read the answer (no CORS on /ws): a "no-cors" request
      // tells an answer it may not read (resolves, opaque) from no answer (rejects).
      try {
        await this._fetch(url, { ...init, mode: "no-cors" });
        hidden = true;
      } catch { /* no answer either */ }
    }
    clearTimeout(timer);
    if (gen !== this._gen) return;
    this._probe = null;
    const again = status === 401 && !this._authRetried && typeof this._tokenSource === "function";
    this._authRetried = again; // one fresh token, at once; refused again: fatal
    if (again) return this._retry(code, reason, { now: true });
    const fatal = { 401: ["unauthorized", "the token"], 403: ["forbidden_origin", "this origin"] };
    if (fatal[status]) {
      return this._fail({ code: fatal[status][0], status,
        message: `the bridge refused ${fatal[status][1]} (HTTP ${status})` }, code, reason);
    }
    const busy = (status === 429 || status === 503) && retryAfter > 0;
    status = status || responseStatus(failure);
    this._connectFailed(status ? { cause: "http", status } : hidden ? { cause: "http" }
      : timedOut ? { cause: "timeout" } : networkCause(rejected) ?? { cause: "unreachable" });
    this._retry(code, reason, { min: busy ? Math.min(retryAfter, 300) * 1000 : 0 });
  }

  _retry(code, reason, { now = false, min = 0 } = {}) {
    this._attempt += 1;
    const delay = now ? 0 : Math.max(min, this._backoff(this._attempt));
    this.state = "reconnecting";
    this._emit("state", { state: "reconnecting", code, reason, attempt: this._attempt, delay });
    this._later("reconnect", delay, () => this._connect());
  }

  /** Full jitter: random() * min(cap, base * 2^(n-1)) ms for the n-th retry (n >= 1). */
  _backoff(n) {
    return this._random() * Math.min(this._cap, this._base * 2 ** Math.min(n - 1, 52));
  }

  _fail(err, code, reason) {
    this._shutdown();
    this._error({ ...err, fatal: true });
    this._emit("state", { state: "closed", code, reason, attempt: this._attempt, delay: null });
  }

  /** Forget the current connection: its handlers, timers, refs and subscription states. */
  _detach() {
    const ws = this._ws;
    if (ws) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    this._ws = null;
    this._welcomed = false;
    this._refs = new Map();
    for (const name of ["stable", "ping", "refresh"]) this._clear(name);
    for (const sub of this._subs.values()) {
      clearTimeout(sub._retryTimer);
      Object.assign(sub, { _ref: null, _confirmed: false, _retryTimer: null, _feedHeld: null });
    }
    if (this._feed) {
      clearTimeout(this._feed._retryTimer);
      Object.assign(this._feed, { _ref: null, _confirmed: false, _retryTimer: null });
    }
  }

  /** Close the current connection on purpose and connect again (with a fresh token). */
  _reconnectNow(reason, now) {
    const ws = this._ws;
    this._detach();
    try { ws?.close(4000, reason); } catch { /* gone */ }
    this._retry(4000, reason, { now });
  }

  _shutdown() {
    this._gen += 1;
    this.state = "closed";
    this._probe?.abort();
    this._probe = null;
    this._detach();
    for (const name of Object.keys(this._timers)) this._clear(name);
    for (const sub of this._subs.values()) {
      sub.active = false;
      this._clearTypists(sub);
      failAllInserts(sub, "closed", "pgbridge: the bridge is closed");
    }
    this._subs.clear();
    if (this._feed) this._feed.active = false;
    this._feed = null;
  }

  _later(name, ms, fn) { // one named timer
    this._timers[name] = setTimeout(() => {
      this._timers[name] = null;
      fn();
    }, ms);
  }

  _clear(name) {
    clearTimeout(this._timers[name]); // also clears an interval
    this._timers[name] = null;
  }

  _emit(type, detail) {
    this.dispatchEvent(typeof CustomEvent === "function"
      ? new CustomEvent(type, { detail }) : Object.assign(new Event(type), { detail }));
  }

  _error(err, sub) {
    const detail = { fatal: false, ...err };
    if (sub) call(sub._options.onError, detail);
    this._emit("error", detail);
  }

  _send(frame) {
    if (this._ws?.readyState !== 1) return false;
    this._ws.send(JSON.stringify(frame));
    return true;
  }

  _ref(prefix, entry) {
    const ref = `${prefix}${++this._nextRef}`;
    if (entry) this._refs.set(ref, entry);
    return ref;
  }

  // --- frames -----------------------------------------------------------------------------

  /** A message holds one frame, or (coalesced) several separated by "\n", which no frame
   * contains raw: each is handled in order, until one of them ends this connection. */
  _onMessage(ws, data) {
    this._rx += 1;
    for (const part of String(data).split("\n")) {
      if (ws !== this._ws) return; // closed or reconnecting: the rest was for that connection
      this._onFrame(part);
    }
  }

  _onFrame(text) {
    let f;
    try { f = JSON.parse(text); } catch { return; }
    if (f === null || typeof f !== "object") return;
    if (f.type === "welcome") this._onWelcome(f);
    else if (f.type === "subscribed") this._onSubscribed(f);
    else if (f.type === "event") this._onEvent(f);
    else if (f.type === "snapshot") this._onSnapshot(f);
    else if (f.type === "unsubscribed") this._onUnsubscribed(f);
    else if (f.type === "error") this._onError(f);
    else if (f.type === "presence") this._onPresence(f);
    else if (f.type === "typing") this._onTyping(f);
    else if (f.type === "feed") this._onFeed(f);
  }

  _onWelcome(f) {
    if (this._welcomed) return;
    this._welcomed = true;
    this._authRetried = false;
    this._ackFactor = 1;
    const attempt = this._attempt;
    this._later("stable", STABLE_MS, () => { this._attempt = 0; });
    this._startPing(this._pingInterval ?? (Number(f.heartbeat) || 0) * 1000);
    this._scheduleRefresh();
    this.user = typeof f.user === "string" ? f.user : null;
    // subscriptions first: each resumes its room after what it delivered, the feed the rest
    for (const sub of this._subs.values()) this._sendSubscribe(sub);
    this._sendFeed();
    const reconnected = this._everWelcomed;
    this._everWelcomed = true;
    this.correlationId = typeof f.correlation_id === "string" ? f.correlation_id : null;
    this.state = "open";
    this._emit("state", { state: "open", code: null, reason: null, attempt, delay: null,
      correlationId: this.correlationId });
    if (reconnected) this._emit("reconnect", { attempt });
  }

  _sendSubscribe(sub) {
    if (!this._welcomed || !sub.active || sub._confirmed) return;
    sub._ref = this._ref("s", { kind: "subscribe", sub });
    const frame = { type: "subscribe", room: sub.room, ref: sub._ref };
    if (sub.lastSeq !== null) frame.since = sub.lastSeq;
    else if (sub._snapshotDue) frame.snapshot = sub._options.snapshot; // until one arrives
    if (sub.presence) frame.presence = true; // never sent otherwise: older servers, same frames
    this._send(frame);
  }

  _retrySubscribe(sub) {
    if (sub._retryTimer) return;
    sub._retryTimer = setTimeout(() => {
      sub._retryTimer = null;
      this._sendSubscribe(sub);
    }, this._backoff(++sub._retries));
  }

  _onSubscribed(f) {
    const entry = this._refs.get(f.ref);
    const sub = this._subs.get(f.room);
    if (!entry || entry.sub !== sub || sub._confirmed) return;
    this._refs.delete(f.ref);
    clearTimeout(sub._retryTimer);
    Object.assign(sub, { _confirmed: true, _retries: 0, _retryTimer: null, _feedHeld: null });
    // a snapshot's seq is held once the snapshot is: a drop before it asks for it again
    if (sub.lastSeq === null && !sub._snapshotDue && Number.isSafeInteger(f.from)) {
      sub.lastSeq = f.from;
    }
    if (sub._ackPending > sub._acked) this._scheduleAcks();
    // Presence is not replayed: the snapshot that follows is the whole truth, and a member
    // absent from it is no longer one.
    sub._members.clear();
    call(sub._options.onSubscribed, f);
  }

  /** An event goes to the room's Subscription if there is one (before its `subscribed`: not
   * ours yet, its replay brings it), else to the feed. */
  _onEvent(f) {
    if (!Number.isSafeInteger(f.seq)) return;
    const sub = this._subs.get(f.room);
    if (!sub) return this._onFeedEvent(f);
    if (!sub._confirmed) { // not (yet) ours: the feed's, held in case the subscribe is refused
      if (this._feed?._rooms.has(f.room)) (sub._feedHeld ??= []).push(f);
      return;
    }
    if (sub.lastSeq !== null && f.seq <= sub.lastSeq) return; // held already: a resend
    sub.lastSeq = f.seq;
    this._feedTrack(f, sub._autoAck);
    if (sub._autoAck) this._ack(sub, f.seq);
    call(sub._options.onEvent, f);
    confirmInsert(sub, f);
  }

  // "Snapshot then live" (PROTOCOL.md): the room's recent messages as of `seq`, between the
  // first `subscribed` (from = seq) and the events after it. A resubscribe resumes with `since`.
  _onSnapshot(f) {
    const sub = this._subs.get(f.room);
    if (!sub?._confirmed || !sub._snapshotDue || !Number.isSafeInteger(f.seq)
      || !Array.isArray(f.messages)) return;
    Object.assign(sub, { lastSeq: f.seq, _snapshotDue: false });
    call(sub._options.onSnapshot, Object.freeze({ room: f.room, seq: f.seq,
      messages: f.messages, truncated: f.truncated === true }));
    // a row written before the snapshot's read is in it and never comes as an event
    for (const m of f.messages) {
      if (typeof m?.id !== "string") continue;
      confirmInsert(sub, { type: "snapshot", room: f.room, seq: f.seq, table: "messages",
        op: "INSERT", id: m.id, data: m });
    }
  }

  _onUnsubscribed(f) {
    this._refs.delete(f.ref); // the answer to our unsubscribe, if it is one
    if (f.reason === "client") return;
    const sub = this._subs.get(f.room);
    if (sub?._confirmed) {
      this._end(sub, { code: String(f.reason), room: sub.room, fatal: true,
        message: `subscription ended by the server: ${f.reason}` });
      if (f.reason === "cursor_expired") return; // the subscription's hole, not the feed's
    }
    this._feedLeave(f.room, String(f.reason));
  }

  _onError(f) {
    const err = { code: f.code, message: f.message, ...(f.room != null && { room: f.room }) };
    const entry = f.ref != null ? this._refs.get(f.ref) : undefined;
    this._refs.delete(f.ref);
    if (entry?.kind === "subscribe") {
      const { sub } = entry;
      if (!sub.active || sub._confirmed || this._subs.get(sub.room) !== sub) return; // stale
      if (RETRIED_SUBSCRIBE.has(f.code)) {
        this._error(err, sub);
        return this._retrySubscribe(sub);
      }
      return this._end(sub, { ...err, room: sub.room, fatal: true });
    }
    if (entry?.kind === "unsubscribe") return; // about a room we left
    if (entry?.kind === "feed") return this._onFeedError(entry.feed, f, err);
    if (entry?.kind === "refresh" || (!entry && f.code === "unauthorized")) { // only refresh
      this._error(err);
      if (f.code !== "unauthorized") return this._refreshLater(true);
      return this._reconnectNow("refresh refused", this._attempt === 0); // with a fresh token
    }
    if (f.code === "rate_limited" && f.ref == null && f.room == null) {
      // A frame was dropped unanswered: slow acks down, and send again, after a backoff
      // delay, the subscribes still unanswered then (a duplicate is refused, and ignored).
      this._ackFactor = Math.min(this._ackFactor * 2, 32);
      for (const sub of this._subs.values()) {
        if (sub._ref && !sub._confirmed) this._retrySubscribe(sub);
      }
      if (this._feed?._ref && !this._feed._confirmed) this._retryFeed(this._feed);
    }
    const sub = f.room != null ? this._subs.get(f.room) : undefined;
    if (!sub?._confirmed && this._feed?._rooms.has(f.room)) { // e.g. a feed room's ack
      call(this._feed._options.onError, { fatal: false, ...err });
    }
    this._error(err, sub?._confirmed ? sub : undefined);
  }

  _unsubscribe(sub) {
    if (!sub.active) return;
    if (sub._confirmed && sub._ackPending > sub._acked) {
      this._send({ type: "ack", room: sub.room, seq: sub._ackPending });
    }
    const ref = sub._ref && this._ref("u", { kind: "unsubscribe" });
    if (ref) this._send({ type: "unsubscribe", room: sub.room, ref });
    this._end(sub);
  }

  _end(sub, err) { // by unsubscribe(), or by the server (err: fatal for it)
    sub.active = false;
    clearTimeout(sub._retryTimer);
    this._clearTypists(sub);
    if (this._subs.get(sub.room) === sub) this._subs.delete(sub.room);
    // ended before its `subscribed`: the events the feed sent meanwhile are the feed's again
    for (const f of sub._feedHeld ?? []) {
      if (this._feed?._rooms.has(sub.room) && !this._subs.has(sub.room)) this._onFeedEvent(f);
    }
    sub._feedHeld = null;
    if (err) this._error(err, sub);
    failAllInserts(sub, "unsubscribed", `pgbridge: ${sub.room} is no longer followed`);
  }

  // --- the feed ---------------------------------------------------------------------------

  _sendFeed() {
    const feed = this._feed;
    if (!this._welcomed || !feed?.active || feed._ref) return;
    feed._ref = this._ref("f", { kind: "feed", feed });
    this._send({ type: "feed", ref: feed._ref });
  }

  _retryFeed(feed) {
    if (feed._retryTimer) return;
    feed._retryTimer = setTimeout(() => {
      feed._retryTimer = null;
      feed._ref = null;
      this._sendFeed();
    }, this._backoff(++feed._retries));
  }

  /** The answer to `feed` replaces the rooms; an ack not sent yet still holds. */
  _onFeed(f) {
    const feed = this._feed;
    if (!feed || this._refs.get(f.ref)?.feed !== feed || feed._confirmed
      || !Array.isArray(f.rooms)) return;
    this._refs.delete(f.ref);
    clearTimeout(feed._retryTimer);
    Object.assign(feed, { _confirmed: true, _retries: 0, _retryTimer: null });
    const count = (v) => (Number.isSafeInteger(v) && v >= 0 ? v : 0);
    feed._rooms.clear();
    feed._counted.clear();
    for (const r of f.rooms) {
      if (typeof r?.room !== "string") continue;
      const head = count(r.head);
      const ack = feed._acks.get(r.room) ?? -1;
      feed._rooms.set(r.room, Object.freeze(ack > count(r.acked)
        ? { head, acked: ack, unread: ack >= head ? 0 : count(r.unread) }
        : { head, acked: count(r.acked), unread: count(r.unread) }));
    }
    for (const room of feed._acks.keys()) if (!feed._rooms.has(room)) feed._acks.delete(room);
    if (feed._acks.size) this._scheduleAcks();
    call(feed._options.onFeed, feed.rooms);
  }

  _onFeedEvent(f) {
    const known = this._feed?._rooms.get(f.room);
    if (known && f.seq <= known.head) return; // held already: a resend
    this._feedTrack(f, false, true);
  }

  /** Keep the feed's entry of the event's room current: `head`, `unread` (+ 1 for a message
   * of another user, - 1 when one it counted is deleted; or, `acked`: the event is
   * acknowledged, read: 0); an unknown room is one the user joined. With `deliver`, the event
   * is the feed's: onEvent. */
  _feedTrack(f, acked, deliver = false) {
    const feed = this._feed;
    if (!feed?._confirmed || typeof f.room !== "string") return; // the answer comes first
    const old = feed._rooms.get(f.room);
    if (old && f.seq <= old.head) return; // a subscription's replay of what the feed knows
    let counted = feed._counted.get(f.room);
    let unread = old?.unread ?? 0;
    if (acked) {
      feed._counted.delete(f.room);
      unread = 0;
    } else if (unreadBy(f, this.user) && typeof f.id === "string") {
      if (!counted) feed._counted.set(f.room, (counted = new Map()));
      counted.set(f.id, f.seq);
      unread += 1;
    } else if (removes(f) && counted?.delete(f.id)) {
      unread = Math.max(0, unread - 1);
    }
    const state = Object.freeze({ head: f.seq, acked: acked ? f.seq : old?.acked ?? 0, unread });
    feed._rooms.set(f.room, state);
    if (!old) call(feed._options.onJoin, f.room, f);
    call(feed._options.onUpdate, f.room, state);
    if (deliver) call(feed._options.onEvent, f);
  }

  /** A room acknowledged up to `seq` (by the feed: `send`; else by its subscription). */
  _feedAck(room, seq, send) {
    const feed = this._feed;
    const old = feed?._rooms.get(room);
    if (!old || seq <= old.acked) return;
    if (send) {
      feed._acks.set(room, seq);
      this._scheduleAcks();
    }
    // read: every message up to `seq`; of those before the answer, only the count is known
    let unread = 0;
    const counted = feed._counted.get(room);
    if (seq < old.head) {
      unread = old.unread;
      for (const [id, at] of counted ?? []) {
        if (at > seq) continue;
        counted.delete(id);
        unread = Math.max(0, unread - 1);
      }
    } else {
      feed._counted.delete(room);
    }
    const state = Object.freeze({ head: old.head, acked: seq, unread });
    feed._rooms.set(room, state);
    call(feed._options.onUpdate, room, state);
  }

  _feedLeave(room, reason) {
    const feed = this._feed;
    if (!feed?._rooms.delete(room)) return;
    feed._acks.delete(room);
    feed._counted.delete(room);
    call(feed._options.onLeave, room, reason);
  }

  /** A refusal of `feed`: sent again after a backoff delay when it passes, else the feed
   * ends. Reported with `feed: true`, to its onError and as the bridge's `error`. */
  _onFeedError(feed, f, err) {
    if (feed !== this._feed || feed._confirmed) return; // stale, or a duplicate's refusal
    const fatal = !RETRIED_SUBSCRIBE.has(f.code);
    const detail = { ...err, feed: true, fatal };
    if (fatal) {
      clearTimeout(feed._retryTimer);
      feed.active = false;
      this._feed = null;
    }
    call(feed._options.onError, detail);
    this._emit("error", detail);
    if (!fatal) this._retryFeed(feed);
  }

  // --- presence and typing ----------------------------------------------------------------
  // Frames of a room followed without `presence`, or before its `subscribed`, are not ours;
  // malformed ones are dropped: nothing in them may throw out of the message handler.

  _onPresence(f) {
    const sub = this._subs.get(f.room);
    if (!sub?.presence || !sub._confirmed) return;
    if (typeof f.user !== "string" || !f.user || typeof f.online !== "boolean") return;
    const text = (v) => (typeof v === "string" ? v : null);
    const presence = Object.freeze({ room: sub.room, user: f.user, online: f.online,
      status: text(f.status) ?? (f.online ? "online" : "offline"),
      lastSeen: text(f.last_seen), customStatus: text(f.custom_status) });
    sub._members.set(f.user, presence);
    call(sub._options.onPresence, presence);
    if (!f.online && sub._typists.delete(f.user)) { // gone: typing no more
      this._scheduleTypists(sub);
      call(sub._options.onTypists, sub.typists());
    }
  }

  _onTyping(f) {
    const sub = this._subs.get(f.room);
    if (!sub?.presence || !sub._confirmed || typeof f.user !== "string" || !f.user) return;
    const known = sub._typists.has(f.user);
    sub._typists.set(f.user, Date.now()); // a known typist keeps their place
    if (!sub._typingTimer) this._scheduleTypists(sub); // else due no later than needed
    call(sub._options.onTyping, { room: sub.room, user: f.user });
    if (!known) call(sub._options.onTypists, sub.typists());
  }

  /** One timer per room, due when its oldest typist expires (at most `typingTimeout` away,
   * whatever the clock does). */
  _scheduleTypists(sub) {
    clearTimeout(sub._typingTimer);
    sub._typingTimer = null;
    if (!sub._typists.size || !sub.active) return;
    const due = Math.min(...sub._typists.values()) + sub._typingTimeout - Date.now();
    sub._typingTimer = setTimeout(() => {
      sub._typingTimer = null;
      this._expireTypists(sub);
    }, Math.min(Math.max(due, 0), sub._typingTimeout));
  }

  _expireTypists(sub) {
    const now = Date.now();
    let changed = false;
    for (const [user, t] of sub._typists) {
      if (now - t < sub._typingTimeout) continue;
      sub._typists.delete(user);
      changed = true;
    }
    this._scheduleTypists(sub);
    if (changed) call(sub._options.onTypists, sub.typists());
  }

  _clearTypists(sub) { // the subscription ended: no timer left, no callback
    clearTimeout(sub._typingTimer);
    sub._typingTimer = null;
    sub._typists.clear();
  }

  _typing(sub) {
    const now = Date.now();
    const elapsed = now - sub._typingSent; // negative: the clock went back, send
    if (!sub.active || !sub._confirmed || (elapsed >= 0 && elapsed < TYPING_INTERVAL_MS)) {
      return false;
    }
    if (!this._send({ type: "typing", room: sub.room })) return false;
    sub._typingSent = now;
    return true;
  }

  // --- acks -------------------------------------------------------------------------------

  _ack(sub, seq) {
    if (!sub.active || seq <= sub._acked || seq <= sub._ackPending) return;
    sub._ackPending = seq;
    this._feedAck(sub.room, seq, false);
    this._scheduleAcks();
  }

  /** One timer for all rooms, and a flush sends at most one ack per room: so at most one ack
   * per room per interval (longer after a `rate_limited` without ref). */
  _scheduleAcks() {
    if (this._timers.ack || this.state === "closed") return;
    this._later("ack", this._ackInterval * this._ackFactor, () => this._flushAcks());
  }

  _flushAcks() { // rooms not (yet) confirmed on this connection wait for their `subscribed`
    if (!this._welcomed) return;
    for (const sub of this._subs.values()) {
      if (!sub._confirmed || sub._ackPending <= sub._acked) continue;
      if (!this._send({ type: "ack", room: sub.room, seq: sub._ackPending })) return;
      sub._acked = sub._ackPending;
    }
    const feed = this._feed;
    if (!feed?._confirmed) return; // sent once the re-sent `feed` is answered
    for (const [room, seq] of feed._acks) {
      if (!this._send({ type: "ack", room, seq })) return;
      feed._acks.delete(room);
    }
  }

  // --- liveness and token refresh ---------------------------------------------------------

  /** Browsers do not see the server's pings: after an interval without any frame, send a
   * `ping`; after another one still silent, the connection is dead: reconnect. */
  _startPing(interval) {
    if (!(interval > 0)) return;
    let seen = this._rx;
    let pinged = false;
    this._timers.ping = setInterval(() => {
      if (this._rx !== seen) {
        seen = this._rx;
        pinged = false;
      } else if (pinged) {
        this._reconnectNow("no answer to ping", false);
      } else {
        pinged = true;
        this._send({ type: "ping", ref: this._ref("p") });
      }
    }, interval);
  }

  _scheduleRefresh(delay) {
    this._clear("refresh");
    if (typeof this._tokenSource !== "function" || this._exp === null) return;
    if (delay === undefined) delay = (this._exp - this._refreshBefore) * 1000 - Date.now();
    this._later("refresh", Math.min(Math.max(delay, 0), MAX_TIMER_MS), () => {
      if (delay > MAX_TIMER_MS) this._scheduleRefresh(); // far away: wait again
      else this._refresh();
    });
  }

  /** Ask again later: halfway to `exp`, 1 to 30 s away (after a backoff delay when `soon`). */
  _refreshLater(soon = false) {
    const left = this._exp * 1000 - Date.now();
    if (!(left > 0)) return; // expired: the server closes with 4001, and we reconnect
    this._scheduleRefresh(soon ? this._backoff(3) : Math.min(Math.max(left / 2, 1000), 30000));
  }

  async _refresh() {
    const { _gen: gen, _ws: ws } = this;
    const token = await this._getToken().catch((err) => {
      if (gen !== this._gen || ws !== this._ws) return;
      this._error({ code: "token_unavailable", message: `no token: ${err?.message ?? err}` });
      this._refreshLater();
    });
    if (gen !== this._gen || ws !== this._ws || !this._welcomed || token === undefined) return;
    const exp = tokenExpiry(token);
    if (token === this._token || (exp !== null && exp <= this._exp)) return this._refreshLater();
    this._send({ type: "refresh", token, ref: this._ref("r", { kind: "refresh" }) });
    Object.assign(this, { _token: token, _exp: exp });
    this._scheduleRefresh();
  }
}
