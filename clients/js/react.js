// react.js: React (>= 18) hooks over pgbridge.js (docs/clients/react.md); types in react.d.ts.
// useRoom: a room's messages kept current (snapshot, then live; resumed across reconnects by
// the client). usePresence, useTypists: its members' presence and who is typing.
//
// The client follows a room once per bridge, so the hooks of one room on one bridge share one
// Subscription: a store per (bridge, room), held by every mounted hook of it (a ref count).
// The store subscribes with what its holders need (`snapshot` for useRoom, `presence` for the
// other two), subscribes again (resuming after the last seq held) when a hook that needs more
// mounts, or without the rows when the last useRoom unmounts and the others stay (acks
// nothing more), and unsubscribes once the last one unmounts. Both are decided a microtask
// after the effects that change them, so the unmount and mount again of StrictMode (and a hook
// moving between components in one commit) change nothing on the wire.

import { useCallback, useEffect, useRef, useSyncExternalStore } from "react";

/** The messages useRoom asks for by default (PROTOCOL.md, "Snapshot then live"). */
export const DEFAULT_SNAPSHOT = 50;

const EMPTY_ROWS = Object.freeze([]);
const EMPTY_MEMBERS = new Map();
const NO_TYPISTS = Object.freeze([]);
const stores = new WeakMap(); // PgBridge -> Map(room -> RoomStore)

/** The store of (bridge, room). Kept once made (a few hundred bytes while nothing holds it),
 * so that every hook of the room finds the same one, whatever the order of renders. */
function storeFor(bridge, room) {
  let rooms = stores.get(bridge);
  if (!rooms) stores.set(bridge, (rooms = new Map()));
  let store = rooms.get(room);
  if (!store) rooms.set(room, (store = new RoomStore(bridge, room)));
  return store;
}

/** Whether an event takes a message out of the room: deleted, soft-deleted, moved away; or
 * not a row useRoom can hold (no string id: left out, as from the snapshot). */
function gone(event, room) {
  const row = event.data;
  return event.op === "DELETE" || !row || typeof row !== "object" || typeof row.id !== "string"
    || Boolean(row.deleted_at) || (typeof row.channel_id === "string" && row.channel_id !== room);
}

class RoomStore {
  constructor(bridge, room) {
    this.bridge = bridge;
    this.room = room;
    this.holders = new Set(); // {rows: N or 0, presence: boolean, onEvent: ref or null}
    this.listeners = new Set();
    this.sub = null; // the current Subscription, while started
    this.has = { rows: false, presence: false }; // what `sub` was asked for
    this.gen = 0; // bumped by each (re)subscribe and by stop(): callbacks of older ones return
    this.due = false; // a reconcile() is queued
    this.notifyDue = false;
    this.watching = false; // listening to the bridge's `state`
    this.reset();
    this.listen = (fn) => {
      this.listeners.add(fn);
      return () => this.listeners.delete(fn);
    };
    this.roomView = () => this.view("room", () => ({ messages: this.rowsView(),
      status: this.status, error: this.error, subscription: this.sub }));
    this.presenceView = () => this.view("presence", () => ({ members: this.membersView(),
      status: this.status, error: this.error }));
    this.typistsView = () => this.view("typists", () => this.typists);
    this.onState = (e) => {
      const state = e.detail?.state;
      if (state === "closed") this.setStatus("closed");
      else if (state !== "open" && this.status === "live") this.setStatus("reconnecting");
    };
  }

  reset() {
    this.rows = []; // the messages held, in order: the snapshot's, then each INSERT's
    this.held = false; // the snapshot arrived: `rows` is the room's
    this.status = "connecting";
    this.error = null;
    this.typists = NO_TYPISTS;
    this.version = { rows: 1, presence: 1, typists: 1, status: 1 };
    this.frozen = { rows: EMPTY_ROWS, rowsAt: 0, members: EMPTY_MEMBERS, membersAt: 0 };
    this.cache = { room: null, presence: null, typists: null }; // the views last built
  }

  // --- views: immutable, rebuilt only when a part they show changed (useSyncExternalStore) ---

  view(name, build) {
    const v = this.version;
    const key = name === "room" ? `${v.rows}.${v.status}` : name === "presence"
      ? `${v.presence}.${v.status}` : `${v.typists}`;
    const cached = this.cache[name];
    if (cached?.key === key) return cached.value;
    const value = build();
    this.cache[name] = { key, value: Object.isFrozen(value) ? value : Object.freeze(value) };
    return this.cache[name].value;
  }

  rowsView() {
    if (this.frozen.rowsAt !== this.version.rows) {
      this.frozen.rows = Object.freeze(this.rows.slice());
      this.frozen.rowsAt = this.version.rows;
    }
    return this.frozen.rows;
  }

  membersView() {
    if (this.frozen.membersAt !== this.version.presence) {
      this.frozen.members = new Map(this.sub?.presence ? this.sub.members : []);
      this.frozen.membersAt = this.version.presence;
    }
    return this.frozen.members;
  }

  changed(part) {
    this.version[part] += 1;
    if (this.notifyDue) return;
    this.notifyDue = true; // once per task: the frames of one message make one render
    queueMicrotask(() => {
      this.notifyDue = false;
      for (const fn of [...this.listeners]) fn();
    });
  }

  setStatus(status, error = null) {
    if (this.status === status && this.error === error) return;
    Object.assign(this, { status, error });
    this.changed("status");
  }

  // --- holders ---------------------------------------------------------------------------

  /** Hold the store with `need` until the returned function is called. */
  acquire(need) {
    this.holders.add(need);
    this.schedule();
    return () => {
      this.holders.delete(need);
      this.schedule();
    };
  }

  schedule() {
    if (this.due) return;
    this.due = true;
    queueMicrotask(() => {
      this.due = false;
      this.reconcile();
    });
  }

  /** Subscribe, subscribe again with more, or stop, as the holders of the moment need. */
  reconcile() {
    if (!this.holders.size) return this.stop();
    let rows = 0;
    let presence = false;
    for (const need of this.holders) {
      rows = Math.max(rows, need.rows);
      presence ||= need.presence;
    }
    // Rows asked for and no useRoom left: subscribe again without them, so that what nobody
    // shows is not acknowledged (autoAck).
    if (this.sub?.active && this.has.rows === rows > 0 && (this.has.presence || !presence)) return;
    if (this.status === "error" || this.status === "closed") return; // until all let go
    this.start(rows, presence);
  }

  start(rows, presence) {
    const old = this.sub;
    const gen = ++this.gen;
    const mine = () => gen === this.gen;
    // Held rows resume after their last seq; else a snapshot of the N most recent. Without
    // useRoom: a snapshot of 1, ignored, so that no backlog since the user's ack is replayed
    // (and nothing is acknowledged: autoAck only with useRoom).
    const resume = rows > 0 && this.held && old?.lastSeq != null;
    const options = { presence, autoAck: rows > 0,
      ...(resume ? { since: old.lastSeq } : { snapshot: rows || 1 }),
      onSubscribed: () => {
        if (!mine()) return;
        if (presence) this.changed("presence"); // emptied, the snapshot of members follows
        if (!rows || this.held) this.setStatus("live");
      },
      onSnapshot: (snapshot) => {
        if (!mine() || !rows) return;
        this.rows = snapshot.messages.filter((row) => typeof row?.id === "string");
        this.held = true;
        this.changed("rows");
        this.setStatus("live");
      },
      onEvent: (event) => {
        if (!mine()) return;
        if (rows && this.held && event.table === "messages") this.apply(event);
        for (const need of [...this.holders]) {
          if (typeof need.onEvent?.current !== "function") continue;
          try { need.onEvent.current(event); } catch (err) { reportError(err); }
        }
      },
      onError: (error) => { if (mine() && error.fatal) this.setStatus("error", error); },
      onPresence: () => { if (mine()) this.changed("presence"); },
      onTypists: (users) => {
        if (!mine()) return;
        this.typists = Object.freeze(users);
        this.changed("typists");
      } };
    if (!resume) { // the rows come again from the snapshot
      this.rows = [];
      this.held = false;
      this.changed("rows");
    }
    this.sub = null;
    old?.unsubscribe();
    this.has = { rows: rows > 0, presence };
    if (this.typists.length) {
      this.typists = NO_TYPISTS;
      this.changed("typists");
    }
    if (!this.watching) {
      this.bridge.addEventListener("state", this.onState);
      this.watching = true;
    }
    if (this.bridge.state === "closed") return this.setStatus("closed");
    try {
      this.sub = this.bridge.subscribe(this.room, options);
    } catch (err) { // a bad room id, or the room followed by other code on this bridge
      return this.setStatus("error", err);
    }
    if (this.status === "live" || this.status === "reconnecting") this.setStatus("connecting");
    this.changed("status"); // `subscription` changed
  }

  /** Nothing holds the store: unsubscribe and forget the room (kept: the store, empty). */
  stop() {
    this.gen += 1;
    this.sub?.unsubscribe();
    this.sub = null;
    this.has = { rows: false, presence: false };
    if (this.watching) this.bridge.removeEventListener("state", this.onState);
    this.watching = false;
    const version = this.version;
    this.reset();
    this.version = { rows: version.rows + 1, presence: version.presence + 1,
      typists: version.typists + 1, status: version.status };
    this.changed("status");
  }

  /** Apply a messages event to the rows held, by id: INSERT appends (seq order), UPDATE
   * replaces, a soft delete or DELETE removes. An UPDATE of a row not held is a row moved into
   * the room (PROTOCOL.md), placed by (created_at, id), or an edit of a message older than the
   * first held, left out as the snapshot left it out. */
  apply(event) {
    const at = this.rows.findIndex((row) => row.id === event.id);
    if (gone(event, this.room)) {
      if (at < 0) return;
      this.rows.splice(at, 1);
    } else if (at >= 0) {
      this.rows[at] = event.data;
    } else if (event.op === "INSERT" || !this.rows.length) {
      this.rows.push(event.data);
    } else {
      const before = (a, b) => {
        const ta = Date.parse(a.created_at);
        const tb = Date.parse(b.created_at);
        return ta < tb || (ta === tb && String(a.id) < String(b.id));
      };
      if (before(event.data, this.rows[0])) return;
      const next = this.rows.findIndex((row) => before(event.data, row));
      this.rows.splice(next < 0 ? this.rows.length : next, 0, event.data);
    }
    this.changed("rows");
  }

  typing() {
    return this.sub?.active ? this.sub.typing() : false;
  }
}

function reportError(err) { // a throwing onEvent must not stop the others
  if (typeof globalThis.reportError === "function") globalThis.reportError(err);
  else queueMicrotask(() => { throw err; });
}

const noListen = () => () => {};
const IDLE_ROOM = Object.freeze({ messages: EMPTY_ROWS, status: "idle", error: null,
  subscription: null });
const IDLE_PRESENCE = Object.freeze({ members: EMPTY_MEMBERS, status: "idle", error: null });
const idleRoom = () => IDLE_ROOM;
const idlePresence = () => IDLE_PRESENCE;
const idleTypists = () => NO_TYPISTS;

function useStore(bridge, room, rows, presence, onEvent) {
  const store = bridge && room ? storeFor(bridge, room) : null;
  useEffect(() => store?.acquire({ rows, presence, onEvent }), [store, rows, presence, onEvent]);
  return store;
}

/**
 * The room's messages, kept current: the `snapshot` most recent (default 50), then every
 * change, resumed by the client across reconnects. See react.d.ts.
 * @param {import("./pgbridge.js").PgBridge | null | undefined} bridge
 * @param {string | null | undefined} room
 * @param {{snapshot?: number, onEvent?: (event: object) => void}} [options]
 */
export function useRoom(bridge, room, options = {}) {
  const snapshot = options.snapshot ?? DEFAULT_SNAPSHOT;
  if (!(Number.isSafeInteger(snapshot) && snapshot >= 1)) {
    throw new TypeError(`pgbridge: useRoom's snapshot must be an integer >= 1, not ${snapshot}`);
  }
  const onEvent = useRef(null);
  useEffect(() => { onEvent.current = options.onEvent ?? null; });
  const store = useStore(bridge, room, snapshot, false, onEvent);
  return useSyncExternalStore(store?.listen ?? noListen, store?.roomView ?? idleRoom,
    store?.roomView ?? idleRoom);
}

/**
 * The room's members: user id -> their last presence (a new Map on each change). See
 * react.d.ts.
 * @param {import("./pgbridge.js").PgBridge | null | undefined} bridge
 * @param {string | null | undefined} room
 */
export function usePresence(bridge, room) {
  const store = useStore(bridge, room, 0, true, null);
  return useSyncExternalStore(store?.listen ?? noListen, store?.presenceView ?? idlePresence,
    store?.presenceView ?? idlePresence);
}

/**
 * Who is typing in the room, and `typing()` to say that this user is. See react.d.ts.
 * @param {import("./pgbridge.js").PgBridge | null | undefined} bridge
 * @param {string | null | undefined} room
 */
export function useTypists(bridge, room) {
  const store = useStore(bridge, room, 0, true, null);
  const typists = useSyncExternalStore(store?.listen ?? noListen,
    store?.typistsView ?? idleTypists, store?.typistsView ?? idleTypists);
  const typing = useCallback(() => store?.typing() ?? false, [store]);
  return { typists, typing };
}
