// Test doubles for pgbridge.js: a scripted in-process WebSocket (the transport, not the thing
// under test), a scripted fetch, JWTs and helpers. Not a test file itself.
import { mock } from "node:test";
import { PgBridge } from "../pgbridge.js";

export const NOW = 1_700_000_000_000; // the mocked clock starts here (ms)

/** A fresh WebSocket class whose instances are recorded in `instances`; each instance is
 * driven from the test: open(), welcome(), recv(frame), drop(code), refuse(error). */
export function fakeWebSocket() {
  class FakeWS {
    static instances = [];
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      this.closedWith = null;
      this.onopen = this.onmessage = this.onclose = this.onerror = null;
      FakeWS.instances.push(this);
    }
    send(text) {
      if (this.readyState !== 1) throw new Error("send on a socket that is not open");
      this.sent.push(JSON.parse(text));
    }
    close(code, reason) { // the client's close: the close event comes later, as in a browser
      this.closedWith = { code, reason };
      if (this.readyState === 3) return;
      this.readyState = 2;
      queueMicrotask(() => this.drop(code ?? 1005, reason ?? ""));
    }
    // --- the server's side ---
    get token() { return new URL(this.url).searchParams.get("token"); }
    open() { this.readyState = 1; this.onopen?.({}); return this; }
    get batch() { return new URL(this.url).searchParams.getAll("batch"); }
    recv(frame) { return this.recvText(JSON.stringify(frame)); }
    recvText(text) { this.onmessage?.({ data: text }); return this; }
    /** One coalesced message: the frames (objects, or strings sent as they are) joined by
     * "\n", as a server asked for `batch` sends them. */
    recvMany(...frames) {
      return this.recvText(frames.map((f) => (typeof f === "string" ? f : JSON.stringify(f)))
        .join("\n"));
    }
    welcome(heartbeat = 20, extra = {}) {
      if (this.readyState === 0) this.open();
      return this.recv({ type: "welcome", user: "u1", protocol: 1, heartbeat, ...extra });
    }
    drop(code = 1006, reason = "") {
      if (this.readyState === 3) return;
      this.readyState = 3;
      this.onclose?.({ code, reason, wasClean: code !== 1006 });
    }
    /** A failed handshake: `error` (with `error`, as the `ws` package gives it: an Error with
     * a system `code`; a browser gives none), then close 1006. */
    refuse(error) {
      this.readyState = 3;
      this.onerror?.(error ? { type: "error", message: error.message, error } : {});
      this.onclose?.({ code: 1006, reason: "" });
    }
    refuseNode20() { this.onerror?.({}); } // Node 20's WebSocket: `error`, no `close`
    frames(type) { return this.sent.filter((f) => f.type === type); }
    /** Answer every subscribe sent so far with `subscribed` (from = since ?? head). */
    confirmAll(head = 0) {
      for (const f of this.frames("subscribe").filter((f) => !f.answered)) {
        f.answered = true;
        this.recv({ type: "subscribed", room: f.room, from: f.since ?? head, head, ref: f.ref });
      }
      return this;
    }
    event(room, seq, extra = {}) { return this.recv(eventFrame(room, seq, extra)); }
    /** A member's `presence` frame (fields as PROTOCOL.md; `extra` overrides any). */
    presence(room, user, online = true, extra = {}) {
      return this.recv({ type: "presence", room, user, status: online ? "online" : "offline",
        online, last_seen: "2026-01-01T00:00:00+00:00", custom_status: null, ...extra });
    }
    typing(room, user) { return this.recv({ type: "typing", room, user }); }
    get last() { return FakeWS.instances.at(-1); }
  }
  return FakeWS;
}

/** An `event` frame of `room` (fields as PROTOCOL.md; `extra` overrides any). */
export function eventFrame(room, seq, extra = {}) {
  return { type: "event", room, seq, table: "messages", op: "INSERT", id: `m${seq}`,
    data: { n: seq }, ts: "2026-01-01T00:00:00+00:00", ...extra };
}

/** An Error as Node gives it for a failed system call: `code` set (ECONNREFUSED, ...). */
export function systemError(code, message = `connect ${code} 127.0.0.1:9`) {
  return Object.assign(new Error(message), { code });
}

/** A fetch answering each call with the next scripted status (a number, {status, headers},
 * or an Error to throw); calls are recorded in `calls`. */
export function fakeFetch(...answers) {
  const f = async (url, init) => {
    f.calls.push({ url, init });
    const a = answers.length > 1 ? answers.shift() : answers[0];
    if (a instanceof Error) throw a;
    const { status, headers = {} } = typeof a === "number" ? { status: a } : a;
    return { status, headers: new Headers(headers), body: null };
  };
  f.calls = [];
  return f;
}

const b64url = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
/** An unsigned JWT-shaped token (the client never verifies). */
export function jwt(claims) { return `${b64url({ alg: "HS256", typ: "JWT" })}.${b64url(claims)}.c2ln`; }

/** Let promises (token function, fetch) settle. */
export async function settle(rounds = 5) {
  for (let i = 0; i < rounds; i++) await new Promise((r) => setImmediate(r));
}

export function useFakeTime() {
  mock.timers.enable({ apis: ["setTimeout", "setInterval", "Date"], now: NOW });
}

/** Advance the mocked clock and let what the timers started settle. */
export async function advance(ms) {
  mock.timers.tick(ms);
  await settle();
}

/** A bridge on a fake transport, recording its events; fetch off unless given. */
export async function connect(options = {}, url = "ws://bridge.test/ws") {
  const WS = options.WebSocket ?? fakeWebSocket();
  const log = { state: [], error: [], reconnect: [] };
  const bridge = new PgBridge(url, { token: "t0k.en.x", fetch: null, random: () => 0.5,
    pingInterval: 0, ...options, WebSocket: WS });
  for (const type of Object.keys(log)) {
    bridge.addEventListener(type, (e) => log[type].push(e.detail));
  }
  await settle();
  return { bridge, WS, log, ws: () => WS.instances.at(-1) };
}

/** Subscribe and record what the subscription receives (presence: `[user, online]` pairs). */
export function follow(bridge, room, options = {}) {
  const got = { events: [], errors: [], subscribed: [], presence: [], typing: [], typists: [] };
  const sub = bridge.subscribe(room, {
    onEvent: (e) => got.events.push(e.seq),
    onError: (e) => got.errors.push(e),
    onSubscribed: (f) => got.subscribed.push(f),
    onPresence: (p) => got.presence.push([p.user, p.online]),
    onTyping: (t) => got.typing.push(t.user),
    onTypists: (users) => got.typists.push(users),
    ...options,
  });
  return Object.assign(got, { sub });
}
