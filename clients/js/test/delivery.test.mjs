// Delivery: subscribe on welcome, resume with since = last delivered seq, each seq once and in
// order whatever the server resends, backoff between attempts.
import { test, beforeEach, afterEach, mock } from "node:test";
import assert from "node:assert/strict";
import { PgBridge } from "../pgbridge.js";
import { advance, connect, fakeWebSocket, follow, settle, useFakeTime } from "./fakes.mjs";

beforeEach(useFakeTime);
afterEach(() => mock.timers.reset());

test("connects with the token in the URL and subscribes every room on welcome", async () => {
  const { bridge, ws, log } = await connect({ token: "a.b=.c" });
  assert.equal(ws().url, "ws://bridge.test/ws?token=a.b%3D.c&batch=0");
  assert.equal(bridge.state, "connecting");
  const a = follow(bridge, "roomA", { since: 41 });
  const b = follow(bridge, "room_B-2");
  assert.equal(ws().sent.length, 0, "nothing is sent before the socket is open");
  ws().welcome();
  assert.equal(bridge.state, "open");
  assert.deepEqual(log.state.map((s) => s.state), ["open"]);
  const subs = ws().frames("subscribe");
  assert.deepEqual(subs.map((f) => [f.room, f.since]), [["roomA", 41], ["room_B-2", undefined]]);
  assert.ok(!("since" in subs[1]), "no since when there is nothing to resume from");
  assert.notEqual(subs[0].ref, subs[1].ref);
  ws().confirmAll(43);
  assert.equal(a.subscribed[0].from, 41);
  assert.equal(b.sub.lastSeq, 43, "a live-only subscription holds the room from `from`");
  const c = follow(bridge, "roomC"); // while open: sent at once
  assert.deepEqual(ws().frames("subscribe").at(-1), { type: "subscribe", room: "roomC", ref: ws().frames("subscribe").at(-1).ref });
  assert.equal(c.sub.active, true);
  bridge.close();
});

test("delivers each seq once and in order whatever the server resends", async () => {
  const { bridge, ws } = await connect();
  const a = follow(bridge, "roomA", { since: 41 });
  ws().welcome();
  ws().event("roomA", 40); // before `subscribed`: not this subscription's yet
  ws().confirmAll(41);
  for (const seq of [41, 42, 43, 42, 43, 44, 44, 1, 45]) ws().event("roomA", seq);
  ws().event("other", 46); // a room we do not follow
  assert.deepEqual(a.events, [42, 43, 44, 45]);
  assert.equal(a.sub.lastSeq, 45);
  bridge.close();
});

test("resumes after drops with since = the last delivered seq, never delivering twice", async () => {
  const { bridge, WS, ws, log } = await connect();
  const a = follow(bridge, "roomA", { since: 10 });
  const b = follow(bridge, "roomB");
  ws().welcome().confirmAll(20);
  ws().event("roomA", 11).event("roomA", 12).event("roomB", 21);
  for (const code of [1006, 1001, 1011, 1013, 4008, 1000, 1012]) {
    ws().drop(code, "bye");
    assert.equal(bridge.state, "reconnecting");
    const s = log.state.at(-1);
    assert.equal(s.code, code);
    assert.equal(s.reason, "bye");
    await advance(s.delay);
    const sock = ws();
    sock.welcome();
    assert.deepEqual(sock.frames("subscribe").map((f) => [f.room, f.since]),
      [["roomA", a.sub.lastSeq], ["roomB", b.sub.lastSeq]]);
    sock.confirmAll();
    // at-least-once across reconnects: the server replays some of what we hold
    const nextA = a.sub.lastSeq + 1;
    sock.event("roomA", nextA - 2).event("roomA", nextA - 1).event("roomA", nextA);
    sock.event("roomB", b.sub.lastSeq).event("roomB", b.sub.lastSeq + 1);
  }
  assert.deepEqual(a.events, [11, 12, 13, 14, 15, 16, 17, 18, 19]);
  assert.deepEqual(b.events, [21, 22, 23, 24, 25, 26, 27, 28]);
  assert.equal(WS.instances.length, 8);
  assert.equal(log.reconnect.length, 7);
  bridge.close();
});

test("a drop before subscribed resumes from since, or without since", async () => {
  const { bridge, ws } = await connect();
  follow(bridge, "roomA", { since: 5 });
  follow(bridge, "roomB");
  ws().welcome(); // subscribes sent, no answer
  ws().drop(1006);
  await advance(10_000);
  ws().welcome();
  const subs = ws().frames("subscribe");
  assert.equal(subs[0].since, 5);
  assert.ok(!("since" in subs[1]));
  bridge.close();
});

test("backoff: full jitter, doubling from base, capped; reset after 5 s open", async () => {
  const draws = [1, 0.5, 0.25, 1, 1, 1, 1, 1, 0, 1];
  let i = 0;
  const random = () => draws[i++ % draws.length];
  const { bridge, WS, ws, log } = await connect({ random, backoff: { base: 100, cap: 3000 } });
  const delays = [];
  for (let n = 0; n < 9; n++) {
    ws().refuse(); // closed before open (fetch off: plain backoff)
    const s = log.state.at(-1);
    assert.equal(s.state, "reconnecting");
    assert.equal(s.attempt, n + 1);
    delays.push(s.delay);
    const before = WS.instances.length;
    if (s.delay > 0) {
      await advance(s.delay - 1);
      assert.equal(WS.instances.length, before, "not before the delay");
    }
    const count = log.state.length;
    await advance(s.delay > 0 ? 1 : 0);
    assert.equal(WS.instances.length, before + 1);
    assert.equal(log.state.length, count, "the attempt starts without a state change");
  }
  assert.deepEqual(delays, [100, 100, 100, 800, 1600, 3000, 3000, 3000, 0]);
  // a connection that dropped soon after welcome keeps counting...
  ws().welcome();
  await advance(4000);
  ws().drop(1011);
  assert.equal(log.state.at(-1).attempt, 10);
  assert.equal(log.state.at(-1).delay, 3000 * draws[9]);
  await advance(3000);
  // ...one open for 5 s starts again from base
  ws().welcome();
  assert.deepEqual(log.reconnect.at(-1), { attempt: 10 });
  await advance(5000);
  ws().drop(1011);
  assert.equal(log.state.at(-1).attempt, 1);
  assert.ok(log.state.at(-1).delay <= 100);
  bridge.close();
});

test("close() sends close 1000, ends subscriptions, and never reconnects", async () => {
  const { bridge, WS, ws, log } = await connect();
  const a = follow(bridge, "roomA");
  ws().welcome().confirmAll(3);
  const sock = ws();
  bridge.close();
  assert.deepEqual(sock.closedWith, { code: 1000, reason: "client closed" });
  assert.equal(bridge.state, "closed");
  assert.equal(a.sub.active, false);
  assert.deepEqual(log.state.at(-1), { state: "closed", code: 1000, reason: "client closed",
    attempt: 0, delay: null });
  await settle();
  sock.event("roomA", 4);
  await advance(60_000);
  assert.equal(WS.instances.length, 1);
  assert.deepEqual(a.events, []);
  assert.throws(() => bridge.subscribe("roomB"), /closed/);
  bridge.close(); // idempotent
  assert.equal(log.state.length, 2);
});

test("close() while reconnecting or while the token is fetched stops everything", async () => {
  const { bridge, WS, ws } = await connect();
  ws().drop(1006);
  bridge.close();
  await advance(60_000);
  assert.equal(WS.instances.length, 1);
  let resolve;
  const slow = await connect({ token: () => new Promise((r) => { resolve = r; }) });
  slow.bridge.close();
  resolve("late.tok.en");
  await settle();
  assert.equal(slow.WS.instances.length, 0);
});

test("URLs: http(s) becomes ws(s), an existing query is kept, a relative URL needs a page", () => {
  const WebSocket = fakeWebSocket();
  const opts = { token: "x", WebSocket, fetch: null };
  const b1 = new PgBridge("https://h.test:8443/ws?x=1#frag", opts);
  assert.equal(b1.url, "wss://h.test:8443/ws?x=1");
  b1.close();
  assert.throws(() => new PgBridge("/ws", opts), TypeError);
  assert.throws(() => new PgBridge("ftp://h/ws", opts), TypeError);
  assert.throws(() => new PgBridge("ws://h/ws", { WebSocket }), /token/);
  const global = Object.getOwnPropertyDescriptor(globalThis, "WebSocket"); // Node 22, a flag
  delete globalThis.WebSocket;
  try {
    assert.throws(() => new PgBridge("ws://h/ws", { token: "x" }), /WebSocket/);
  } finally {
    if (global) Object.defineProperty(globalThis, "WebSocket", global);
  }
  const b2 = new PgBridge("ws://h/ws", opts);
  assert.throws(() => b2.subscribe("bad room!"), TypeError);
  assert.throws(() => b2.subscribe("r", { since: -1 }), TypeError);
  assert.throws(() => b2.subscribe("r", { since: 1.5 }), TypeError);
  b2.subscribe("r");
  assert.throws(() => b2.subscribe("r"), /already/);
  b2.close();
});

test("randomized: replays, duplicates and drops never break once-and-in-order", async () => {
  let seed = 42;
  const rand = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
  const { bridge, ws, log } = await connect({ random: rand });
  const a = follow(bridge, "roomA", { since: 0 });
  let head = 0;
  for (let round = 0; round < 200; round++) {
    ws().welcome();
    const [sub] = ws().frames("subscribe");
    assert.equal(sub.since, a.sub.lastSeq, "resumes after the last delivered seq");
    ws().confirmAll(head);
    // the server is at-least-once across reconnects: it may start anywhere at or before since
    let next = Math.max(1, sub.since + 1 - Math.floor(rand() * 5));
    for (let n = Math.floor(rand() * 8); n > 0; n--) {
      if (rand() < 0.2 && next > 1) next -= 1 + Math.floor(rand() * Math.min(3, next - 1)); // resend
      head = Math.max(head, next);
      ws().event("roomA", next++);
    }
    ws().drop([1006, 1001, 1011, 4008][Math.floor(rand() * 4)]);
    await advance(log.state.at(-1).delay);
  }
  assert.ok(a.events.length > 100);
  a.events.forEach((seq, i) => assert.equal(seq, i + 1, "each seq once, in order, no gap"));
  bridge.close();
});

test("exposes each connection's correlation id from its welcome", async () => {
  const { bridge, ws, log } = await connect();
  assert.equal(bridge.correlationId, null, "none before the first welcome");
  ws().welcome(20, { correlation_id: "00112233aabbccdd" });
  assert.equal(bridge.correlationId, "00112233aabbccdd");
  assert.equal(log.state.at(-1).correlationId, "00112233aabbccdd");
  ws().drop(1011);
  assert.equal(bridge.correlationId, "00112233aabbccdd", "kept once the connection ended");
  await advance(60000);
  ws().welcome(); // a server that does not send one
  assert.equal(bridge.state, "open");
  assert.equal(bridge.correlationId, null);
  assert.equal(log.state.at(-1).correlationId, null);
  bridge.close();
});
