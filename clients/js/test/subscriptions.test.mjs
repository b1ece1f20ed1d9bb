// Subscriptions: refusals per room, losing access, retried subscribes, acks, unsubscribe,
// liveness, and no timer left after close().
import { test, beforeEach, afterEach, mock } from "node:test";
import assert from "node:assert/strict";
import { PgBridge } from "../pgbridge.js";
import { advance, connect, fakeWebSocket, follow, settle, useFakeTime } from "./fakes.mjs";

const error = (code, f, room = f.room) => ({ type: "error", code, message: code, ref: f.ref, room });

test.describe("with a mocked clock", () => {
  beforeEach(useFakeTime);
  afterEach(() => mock.timers.reset());

  for (const code of ["forbidden", "not_found", "cursor_expired", "bad_request"]) {
    test(`${code} on a subscribe ends that subscription only`, async () => {
      const { bridge, ws, log } = await connect();
      const a = follow(bridge, "roomA", { since: 1 });
      const b = follow(bridge, "roomB");
      ws().welcome();
      const [sa, sb] = ws().frames("subscribe");
      ws().recv(error(code, sa));
      ws().recv({ type: "subscribed", room: "roomB", from: 0, head: 0, ref: sb.ref });
      assert.equal(a.sub.active, false);
      assert.deepEqual(a.errors, [{ code, message: code, room: "roomA", fatal: true }]);
      assert.deepEqual(log.error, a.errors);
      ws().event("roomA", 2).event("roomB", 1);
      assert.deepEqual([a.events, b.events], [[], [1]]);
      // the app may subscribe again (after cursor_expired: without since)
      const again = follow(bridge, "roomA");
      assert.ok(!("since" in ws().frames("subscribe").at(-1)));
      ws().confirmAll(9);
      ws().event("roomA", 10);
      assert.deepEqual(again.events, [10]);
      // after a reconnect the ended subscription is not resumed
      ws().drop(1006);
      await advance(log.state.at(-1).delay);
      ws().welcome();
      assert.deepEqual(ws().frames("subscribe").map((f) => f.room), ["roomB", "roomA"]);
      bridge.close();
    });
  }

  for (const code of ["rate_limited", "internal"]) {
    test(`${code} on a subscribe: sent again after a backoff delay`, async () => {
      const { bridge, ws, log } = await connect({ random: () => 1 });
      const a = follow(bridge, "roomA", { since: 4 });
      ws().welcome();
      for (const wait of [250, 500, 1000]) {
        const f = ws().frames("subscribe").at(-1);
        ws().recv(error(code, f));
        assert.equal(a.errors.at(-1).fatal, false);
        await advance(wait - 1);
        assert.equal(ws().frames("subscribe").length, 1 + [250, 500, 1000].indexOf(wait));
        await advance(1);
      }
      const last = ws().frames("subscribe").at(-1);
      assert.equal(last.since, 4);
      ws().confirmAll();
      assert.equal(a.sub.active, true);
      assert.equal(a.subscribed.length, 1);
      assert.equal(log.error.length, 3);
      bridge.close();
    });
  }

  for (const reason of ["membership_revoked", "room_deleted"]) {
    test(`unsubscribed ${reason}: the subscription ends, fatal`, async () => {
      const { bridge, ws } = await connect();
      const a = follow(bridge, "roomA");
      ws().welcome().confirmAll(3);
      ws().event("roomA", 4);
      ws().recv({ type: "unsubscribed", room: "roomA", reason, ref: null });
      ws().event("roomA", 5);
      assert.deepEqual(a.events, [4]);
      assert.equal(a.sub.active, false);
      assert.equal(a.errors[0].code, reason);
      assert.equal(a.errors[0].fatal, true);
      bridge.close();
    });
  }

  test("non-fatal errors are surfaced and change nothing", async () => {
    const { bridge, ws, log } = await connect();
    const a = follow(bridge, "roomA");
    ws().welcome().confirmAll(3);
    ws().recv({ type: "error", code: "bad_request", message: "ack", ref: null, room: "roomA" });
    ws().recv({ type: "error", code: "unknown_type", message: "?", ref: null, room: null });
    ws().event("roomA", 4);
    assert.deepEqual(log.error.map((e) => [e.code, e.fatal]), [["bad_request", false], ["unknown_type", false]]);
    assert.deepEqual(a.errors.map((e) => e.code), ["bad_request"]);
    assert.deepEqual(a.events, [4]);
    bridge.close();
  });

  test("a subscribe dropped by the frame rate limit is sent again; duplicates ignored", async () => {
    const { bridge, ws, log } = await connect({ random: () => 1 });
    const a = follow(bridge, "roomA", { since: 2 });
    ws().welcome();
    const [first] = ws().frames("subscribe");
    ws().recv({ type: "error", code: "rate_limited", message: "slow down", ref: null, room: null });
    await advance(250);
    const [, second] = ws().frames("subscribe");
    assert.equal(second.since, 2);
    // the first was in fact served: `subscribed`, then "already subscribed" for the second
    ws().recv({ type: "subscribed", room: "roomA", from: 2, head: 5, ref: first.ref });
    ws().recv(error("bad_request", second));
    ws().event("roomA", 3);
    assert.equal(a.sub.active, true);
    assert.deepEqual(a.events, [3]);
    assert.deepEqual(log.error.map((e) => e.code), ["rate_limited"]);
    bridge.close();
  });

  test("auto-ack: batched, one ack per room per interval, the highest seq", async () => {
    const { bridge, ws } = await connect({ ackInterval: 1000 });
    follow(bridge, "roomA");
    follow(bridge, "roomB");
    follow(bridge, "roomC", { autoAck: false });
    ws().welcome().confirmAll(0);
    for (let s = 1; s <= 50; s++) ws().event("roomA", s).event("roomC", s);
    ws().event("roomB", 1);
    await advance(999);
    assert.equal(ws().frames("ack").length, 0);
    await advance(1);
    assert.deepEqual(ws().frames("ack").map((f) => [f.room, f.seq]), [["roomA", 50], ["roomB", 1]]);
    ws().event("roomA", 51);
    await advance(500);
    ws().event("roomA", 52);
    await advance(499);
    assert.equal(ws().frames("ack").length, 2);
    await advance(1);
    assert.deepEqual(ws().frames("ack").at(-1), { type: "ack", room: "roomA", seq: 52 });
    await advance(10_000);
    assert.equal(ws().frames("ack").length, 3, "nothing new, nothing sent");
    bridge.close();
  });

  test("acks wait for the resubscribe after a reconnect; close() flushes them", async () => {
    const { bridge, ws, log } = await connect({ ackInterval: 1000 });
    follow(bridge, "roomA");
    ws().welcome().confirmAll(0);
    ws().event("roomA", 1);
    ws().drop(1006);
    await advance(log.state.at(-1).delay);
    ws().welcome();
    await advance(2000);
    assert.equal(ws().frames("ack").length, 0, "not before `subscribed` on this connection");
    ws().confirmAll();
    await advance(1000);
    assert.deepEqual(ws().frames("ack"), [{ type: "ack", room: "roomA", seq: 1 }]);
    ws().event("roomA", 2);
    const sock = ws();
    bridge.close();
    assert.deepEqual(sock.frames("ack").at(-1), { type: "ack", room: "roomA", seq: 2 });
    assert.equal(sock.sent.at(-1).type, "ack");
    assert.equal(sock.closedWith.code, 1000);
  });

  test("sub.ack() by hand: up to lastSeq, batched", async () => {
    const { bridge, ws } = await connect({ ackInterval: 100 });
    const a = follow(bridge, "roomA", { autoAck: false });
    assert.throws(() => a.sub.ack(1), RangeError);
    ws().welcome().confirmAll(10);
    ws().event("roomA", 11).event("roomA", 12);
    assert.throws(() => a.sub.ack(13), RangeError);
    a.sub.ack(11);
    a.sub.ack(12);
    a.sub.ack(10); // below what is pending: nothing
    await advance(100);
    assert.deepEqual(ws().frames("ack"), [{ type: "ack", room: "roomA", seq: 12 }]);
    bridge.close();
  });

  test("unsubscribe: pending ack first, then unsubscribe; later frames of the room ignored", async () => {
    const { bridge, ws, log } = await connect();
    const a = follow(bridge, "roomA");
    ws().welcome().confirmAll(0);
    ws().event("roomA", 1);
    a.sub.unsubscribe();
    a.sub.unsubscribe();
    const sent = ws().sent.slice(-2);
    assert.deepEqual(sent.map((f) => f.type), ["ack", "unsubscribe"]);
    assert.equal(a.sub.active, false);
    ws().event("roomA", 2);
    ws().recv({ type: "unsubscribed", room: "roomA", reason: "client", ref: sent[1].ref });
    // subscribe again before the server's answers drain: stale frames are not the new one's
    const b = follow(bridge, "roomA", { since: 5 });
    ws().event("roomA", 3);
    ws().recv({ type: "error", code: "not_found", message: "x", ref: "u999", room: "roomA" });
    ws().confirmAll();
    ws().event("roomA", 5).event("roomA", 6);
    assert.deepEqual([a.events, b.events], [[1], [6]]);
    assert.equal(b.sub.active, true);
    assert.equal(log.error.filter((e) => e.fatal).length, 0);
    // unsubscribe while disconnected sends nothing and is not resumed
    ws().drop(1006);
    b.sub.unsubscribe();
    await advance(log.state.at(-1).delay);
    ws().welcome();
    assert.equal(ws().frames("subscribe").length, 0);
    bridge.close();
  });

  test("liveness: ping after a silent heartbeat, reconnect after another", async () => {
    const { bridge, WS, ws, log } = await connect({ pingInterval: undefined });
    follow(bridge, "roomA");
    ws().welcome(20).confirmAll(0);
    await advance(20_000); // frames arrived during this interval
    assert.equal(ws().frames("ping").length, 0);
    await advance(20_000); // a silent one
    assert.equal(ws().frames("ping").length, 1);
    ws().recv({ type: "pong", ref: ws().frames("ping")[0].ref });
    await advance(15_000);
    ws().event("roomA", 1);
    await advance(20_000);
    assert.equal(ws().frames("ping").length, 1, "frames arrived: no ping needed");
    await advance(5_000); // silent since the check at 60 s
    assert.equal(ws().frames("ping").length, 2);
    const sock = ws();
    await advance(20_000);
    assert.equal(sock.closedWith.code, 4000);
    assert.equal(log.state.at(-1).state, "reconnecting");
    await advance(log.state.at(-1).delay);
    ws().welcome();
    assert.equal(ws().frames("subscribe")[0].since, 1);
    assert.equal(WS.instances.length, 2);
    bridge.close();
  });

  test("a throwing callback does not stop delivery", async (t) => {
    const thrown = [];
    const { bridge, ws } = await connect();
    let n = 0;
    const seen = [];
    bridge.subscribe("roomA", { onEvent: (e) => { seen.push(e.seq); if (++n === 1) throw new Error("app bug"); } });
    globalThis.reportError = (err) => thrown.push(err.message); // as in a browser
    t.after(() => { delete globalThis.reportError; });
    ws().welcome().confirmAll(0);
    ws().event("roomA", 1).event("roomA", 2);
    assert.deepEqual(seen, [1, 2]);
    bridge.close();
    await settle();
    assert.deepEqual(thrown, ["app bug"]);
  });
});

test("close() leaves no timer behind (real clock)", async () => {
  const timers = () => process.getActiveResourcesInfo().filter((r) => r === "Timeout").length;
  const before = timers();
  const WebSocket = fakeWebSocket();
  const exp = Math.floor(Date.now() / 1000) + 3600;
  const token = () => `e30.${Buffer.from(JSON.stringify({ exp })).toString("base64url")}.x`;
  // open, with ping, refresh, stable and ack timers running, and a subscribe retry pending
  const b1 = new PgBridge("ws://h.test/ws", { token, WebSocket, fetch: null });
  const a = b1.subscribe("roomA");
  const r = b1.subscribe("roomR");
  await settle();
  const sock = WebSocket.instances[0].welcome();
  const [sa, sr] = sock.frames("subscribe");
  sock.recv({ type: "subscribed", room: "roomA", from: 0, head: 0, ref: sa.ref }).event("roomA", 1);
  sock.recv({ type: "error", code: "internal", message: "db", ref: sr.ref, room: "roomR" });
  assert.ok(timers() >= before + 5);
  b1.close();
  // reconnecting, with its backoff timer pending
  const b2 = new PgBridge("ws://h.test/ws", { token, WebSocket, fetch: null });
  await settle();
  WebSocket.instances[1].refuse();
  assert.equal(b2.state, "reconnecting");
  b2.close();
  // probing a refused handshake (fetch never answers until aborted)
  const fetch = (url, { signal }) => new Promise((_, reject) => signal.addEventListener("abort", () => reject(new Error("aborted"))));
  const b3 = new PgBridge("ws://h.test/ws", { token, WebSocket, fetch });
  await settle();
  WebSocket.instances[2].refuse();
  await settle();
  b3.close();
  await settle();
  assert.equal(timers(), before);
  assert.equal(a.active && r.active, false);
  assert.equal(WebSocket.instances.length, 3);
});
