// Coalesced messages: the client asks for `batch=` on every (re)connect and splits every message
// on "\n" into frames, each handled as a lone frame is; servers that do not coalesce still work.
import { test, beforeEach, afterEach, mock } from "node:test";
import assert from "node:assert/strict";
import { PgBridge } from "../pgbridge.js";
import { advance, connect, eventFrame, fakeFetch, fakeWebSocket, follow, settle, useFakeTime }
  from "./fakes.mjs";

beforeEach(useFakeTime);
afterEach(() => mock.timers.reset());

test("the URL asks for batch=0 by default, the option's value when given, none with null",
  async () => {
    for (const [options, url] of [
      [{}, "ws://bridge.test/ws?token=t0k.en.x&batch=0"],
      [{ batch: undefined }, "ws://bridge.test/ws?token=t0k.en.x&batch=0"],
      [{ batch: 25 }, "ws://bridge.test/ws?token=t0k.en.x&batch=25"],
      [{ batch: 1000 }, "ws://bridge.test/ws?token=t0k.en.x&batch=1000"],
      [{ batch: null }, "ws://bridge.test/ws?token=t0k.en.x"],
    ]) {
      const { bridge, ws } = await connect(options);
      assert.equal(ws().url, url, JSON.stringify(options));
      bridge.close();
    }
  });

test("batch= is sent on every reconnect, and in the probe of a refused handshake", async () => {
  const fetch = fakeFetch(426);
  const { bridge, WS, ws, log } = await connect({ batch: 25, fetch, token: () => "a.b.c" });
  ws().welcome(20, { batch: 25 });
  ws().drop(1006);
  await advance(log.state.at(-1).delay);
  assert.equal(ws().url, "ws://bridge.test/ws?token=a.b.c&batch=25");
  ws().refuse();
  await advance(0);
  assert.deepEqual(fetch.calls.map((c) => c.url), ["http://bridge.test/ws?token=a.b.c&batch=25"]);
  await advance(log.state.at(-1).delay);
  assert.equal(WS.instances.length, 3);
  assert.ok(WS.instances.every((s) => s.batch.length === 1 && s.batch[0] === "25"));
  bridge.close();
});

test("a batch already in the URL is replaced by the option's (never repeated), kept with null",
  async () => {
    const url = "ws://h.test/ws?batch=7&v=1&batchy=2&bat%63h=8&%ZZ";
    let { bridge, ws } = await connect({ batch: 5 }, url);
    assert.equal(ws().url, "ws://h.test/ws?v=1&batchy=2&%ZZ&token=t0k.en.x&batch=5");
    bridge.close();
    ({ bridge, ws } = await connect({ batch: null }, "ws://h.test/ws?batch=7"));
    assert.equal(ws().url, "ws://h.test/ws?batch=7&token=t0k.en.x");
    bridge.close();
  });

test("a bad batch throws TypeError at construction, and connects nowhere", () => {
  const WebSocket = fakeWebSocket();
  for (const batch of [-1, 1001, 2.5, NaN, Infinity, "25", "", true, false, {}, [5], 10n]) {
    assert.throws(() => new PgBridge("ws://h/ws", { token: "x", WebSocket, fetch: null, batch }),
      (err) => err instanceof TypeError && /batch/.test(err.message), String(batch));
  }
  assert.equal(WebSocket.instances.length, 0);
});

test("one message holding subscribed and several events delivers them in order, once",
  async () => {
    const { bridge, ws } = await connect({ batch: 25 });
    const order = [];
    const a = follow(bridge, "roomA", { since: 0,
      onSubscribed: (f) => order.push(`subscribed ${f.from}`),
      onEvent: (e) => order.push(e.seq) });
    const b = follow(bridge, "roomB", { since: 0 });
    ws().welcome(20, { batch: 25 });
    const [subA, subB] = ws().frames("subscribe");
    ws().recvMany(
      { type: "subscribed", room: "roomA", from: 0, head: 3, ref: subA.ref },
      eventFrame("roomA", 1), eventFrame("roomA", 2), eventFrame("roomA", 3));
    assert.deepEqual(order, ["subscribed 0", 1, 2, 3]);
    assert.equal(a.sub.lastSeq, 3);
    // interleaved rooms, resends within a message and across messages: each seq once
    ws().recvMany(
      { type: "subscribed", room: "roomB", from: 0, head: 0, ref: subB.ref },
      eventFrame("roomA", 2), eventFrame("roomB", 1), eventFrame("roomA", 4),
      eventFrame("roomA", 4), eventFrame("roomB", 2), eventFrame("roomA", 3));
    ws().recvMany(eventFrame("roomA", 4), eventFrame("roomA", 5), eventFrame("roomB", 2));
    assert.deepEqual(order, ["subscribed 0", 1, 2, 3, 4, 5]);
    assert.deepEqual(b.events, [1, 2]);
    await advance(1000); // the autoAcks: one per room, up to the last delivered
    assert.deepEqual(ws().frames("ack").map((f) => [f.room, f.seq]), [["roomA", 5], ["roomB", 2]]);
    bridge.close();
  });

test("a part that is not a JSON object is skipped, the others of its message delivered",
  async () => {
    const { bridge, ws } = await connect();
    const a = follow(bridge, "roomA", { since: 0 });
    ws().welcome().confirmAll();
    ws().recvMany(eventFrame("roomA", 1), "{not json", eventFrame("roomA", 2));
    ws().recvMany("", eventFrame("roomA", 3), "null", "42", '"event"', "[]",
      JSON.stringify(eventFrame("roomA", 4)).slice(0, -1), eventFrame("roomA", 5), "");
    ws().recvText("garbage only");
    ws().recvText("\n\n");
    ws().event("roomA", 6);
    assert.deepEqual(a.events, [1, 2, 3, 5, 6]);
    assert.equal(bridge.state, "open");
    bridge.close();
  });

test("a newline inside a frame's strings is escaped JSON: one frame, delivered intact",
  async () => {
    const { bridge, ws } = await connect();
    const texts = [];
    follow(bridge, "roomA", { since: 0, onEvent: (e) => texts.push(e.data.text) });
    ws().welcome().confirmAll();
    ws().recvMany(eventFrame("roomA", 1, { data: { text: "a\nb\r\n" } }),
      eventFrame("roomA", 2, { data: { text: "\n" } }));
    assert.deepEqual(texts, ["a\nb\r\n", "\n"]);
    bridge.close();
  });

test("frames after one that ends the connection are not handled", async () => {
  // An unauthorized refresh: the client closes and reconnects; the rest was for that socket.
  let { bridge, ws, log } = await connect({ token: () => "a.b.c" });
  let a = follow(bridge, "roomA", { since: 0 });
  ws().welcome().confirmAll();
  const first = ws();
  first.recvMany(eventFrame("roomA", 1), { type: "error", code: "unauthorized", message: "no" },
    eventFrame("roomA", 2), { type: "error", code: "internal", message: "stale" });
  assert.deepEqual(a.events, [1]);
  assert.deepEqual(log.error.map((e) => e.code), ["unauthorized"]);
  assert.equal(first.closedWith.code, 4000);
  assert.equal(log.state.at(-1).state, "reconnecting");
  bridge.close();
  // A callback that closes the bridge: nothing more is delivered.
  ({ bridge, ws } = await connect());
  const seen = [];
  follow(bridge, "roomA", { since: 0,
    onEvent: (e) => { seen.push(e.seq); if (e.seq === 2) bridge.close(); } });
  ws().welcome().confirmAll();
  ws().recvMany(eventFrame("roomA", 1), eventFrame("roomA", 2), eventFrame("roomA", 3));
  assert.deepEqual(seen, [1, 2]);
  assert.equal(bridge.state, "closed");
  // A fatal unsubscribed ends its room only: the others of the message are delivered.
  ({ bridge, ws } = await connect());
  a = follow(bridge, "roomA", { since: 0 });
  const b = follow(bridge, "roomB", { since: 0 });
  ws().welcome().confirmAll();
  ws().recvMany(eventFrame("roomA", 1), { type: "unsubscribed", room: "roomA",
    reason: "membership_revoked" }, eventFrame("roomA", 2), eventFrame("roomB", 1));
  assert.deepEqual(a.events, [1]);
  assert.equal(a.sub.active, false);
  assert.deepEqual(b.events, [1]);
  bridge.close();
});

test("an older server (welcome without batch, one frame per message) works as before",
  async () => {
    for (const batch of [0, 25, null]) {
      const { bridge, WS, ws, log } = await connect({ batch });
      const a = follow(bridge, "roomA", { since: 0 });
      ws().welcome(); // no `batch`: the parameter was ignored
      assert.equal(bridge.state, "open");
      ws().confirmAll(2);
      for (const seq of [1, 2, 2, 3]) ws().event("roomA", seq);
      ws().drop(1006);
      await advance(log.state.at(-1).delay);
      ws().welcome().confirmAll();
      ws().event("roomA", 3).event("roomA", 4);
      assert.deepEqual(a.events, [1, 2, 3, 4], String(batch));
      assert.deepEqual(WS.instances[1].frames("subscribe").map((f) => f.since), [3]);
      bridge.close();
    }
  });

test("a coalesced message counts once as traffic for the liveness ping", async () => {
  const { bridge, ws } = await connect({ pingInterval: 1000 });
  follow(bridge, "roomA", { since: 0 });
  ws().welcome().confirmAll();
  await advance(500);
  ws().recvMany(eventFrame("roomA", 1), eventFrame("roomA", 2));
  await advance(600); // traffic in the interval: no ping
  assert.equal(ws().frames("ping").length, 0);
  await advance(1000); // silent: ping
  assert.equal(ws().frames("ping").length, 1);
  ws().recvMany({ type: "pong", ref: ws().frames("ping")[0].ref });
  await advance(1000);
  assert.equal(ws().frames("ping").length, 1);
  assert.equal(bridge.state, "open");
  bridge.close();
  await settle();
});
