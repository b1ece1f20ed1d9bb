// Presence and typing: asked for per room only, the member map rebuilt from each snapshot,
// typing signals throttled on the way out and expired on the way in, stray and malformed
// frames ignored, no timer left behind.
import { test, beforeEach, afterEach, mock } from "node:test";
import assert from "node:assert/strict";
import { PgBridge } from "../pgbridge.js";
import { advance, connect, fakeWebSocket, follow, settle, useFakeTime } from "./fakes.mjs";

const online = (sub) => [...sub.members.values()].map((p) => [p.user, p.online]);

test.describe("with a mocked clock", () => {
  beforeEach(useFakeTime);
  afterEach(() => mock.timers.reset());

  test("subscribe sends presence only when asked, on every (re)subscribe", async () => {
    const { bridge, ws, log } = await connect();
    const plain = follow(bridge, "roomA");
    follow(bridge, "roomB", { presence: false });
    const withPresence = follow(bridge, "roomC", { presence: true, since: 3 });
    assert.deepEqual([plain.sub.presence, withPresence.sub.presence], [false, true]);
    assert.throws(() => bridge.subscribe("roomD", { presence: "yes" }), TypeError);
    for (const typingTimeout of [0, -1, "5000", NaN, Infinity]) {
      assert.throws(() => bridge.subscribe("roomD", { presence: true, typingTimeout }), TypeError);
    }
    ws().welcome();
    const [a, b, c] = ws().frames("subscribe");
    assert.ok(!("presence" in a) && !("presence" in b), "nothing new asked, nothing new sent");
    assert.deepEqual(c, { type: "subscribe", room: "roomC", ref: c.ref, since: 3, presence: true });
    ws().confirmAll(3).drop(1006);
    await advance(log.state.at(-1).delay);
    ws().welcome();
    assert.deepEqual(ws().frames("subscribe").map((f) => [f.room, f.presence]),
      [["roomA", undefined], ["roomB", undefined], ["roomC", true]]);
    bridge.close();
  });

  test("the snapshot builds the member map; changes update it", async () => {
    const { bridge, ws } = await connect();
    const a = follow(bridge, "roomA", { presence: true });
    ws().welcome();
    ws().presence("roomA", "u0"); // before `subscribed`: not this subscription's yet
    ws().confirmAll(0);
    ws().presence("roomA", "u1", true, { custom_status: "on a call" })
      .presence("roomA", "u2", false, { status: "away", last_seen: null });
    assert.deepEqual(online(a.sub), [["u1", true], ["u2", false]]);
    assert.deepEqual({ ...a.sub.members.get("u2") }, { room: "roomA", user: "u2", online: false,
      status: "away", lastSeen: null, customStatus: null });
    assert.equal(a.sub.members.get("u1").customStatus, "on a call");
    assert.equal(a.sub.members.get("u1").lastSeen, "2026-01-01T00:00:00+00:00");
    // changes: the last frame of a user is their state
    ws().presence("roomA", "u2", true).presence("roomA", "u1", false)
      .presence("roomA", "u3", true); // joined after the snapshot
    assert.deepEqual(online(a.sub), [["u1", false], ["u2", true], ["u3", true]]);
    assert.deepEqual(a.presence, [["u1", true], ["u2", false], ["u2", true], ["u1", false],
      ["u3", true]]);
    // read-only: a view, whose entries are frozen
    assert.equal(a.sub.members.size, 3);
    assert.equal(typeof a.sub.members.set, "undefined");
    assert.throws(() => { a.sub.members.get("u1").online = true; }, TypeError);
    assert.deepEqual([...new Map(a.sub.members).keys()], ["u1", "u2", "u3"]);
    const seen = [];
    a.sub.members.forEach((p, user, map) => seen.push([user, map === a.sub.members]));
    assert.deepEqual(seen, [["u1", true], ["u2", true], ["u3", true]]);
    bridge.close();
  });

  test("a resubscribe after a reconnect clears the member map and rebuilds it", async () => {
    const { bridge, ws, log } = await connect();
    const sizes = [];
    const a = follow(bridge, "roomA", { presence: true,
      onSubscribed: () => sizes.push(a.sub.members.size) });
    ws().welcome().confirmAll(0);
    ws().presence("roomA", "u1").presence("roomA", "u2").presence("roomA", "u3");
    ws().drop(1006);
    assert.equal(a.sub.members.size, 3, "as last known while reconnecting");
    await advance(log.state.at(-1).delay);
    ws().welcome();
    assert.equal(a.sub.members.size, 3, "until the resubscribe is confirmed");
    ws().confirmAll();
    assert.deepEqual(sizes, [0, 0], "empty when onSubscribed is called");
    // u2 left the room meanwhile: absent from the new snapshot, no longer a member
    ws().presence("roomA", "u1", false).presence("roomA", "u3");
    assert.deepEqual(online(a.sub), [["u1", false], ["u3", true]]);
    bridge.close();
  });

  test("typing() is sent once subscribed, at most once a second", async () => {
    const { bridge, ws, log } = await connect();
    const a = follow(bridge, "roomA", { presence: true });
    const b = follow(bridge, "roomB"); // typing needs no presence
    assert.equal(a.sub.typing(), false, "not connected");
    ws().welcome();
    assert.equal(a.sub.typing(), false, "not yet subscribed");
    ws().confirmAll(0);
    assert.equal(a.sub.typing(), true);
    assert.deepEqual(ws().frames("typing"), [{ type: "typing", room: "roomA" }]);
    assert.equal(a.sub.typing(), false);
    assert.equal(b.sub.typing(), true, "per room");
    await advance(999);
    assert.equal(a.sub.typing(), false);
    await advance(1);
    assert.equal(a.sub.typing(), true);
    for (let i = 0; i < 50; i++) { // a keystroke every 100 ms for 5 s: one signal a second
      await advance(100);
      a.sub.typing();
    }
    assert.equal(ws().frames("typing").filter((f) => f.room === "roomA").length, 7);
    // dropped: not sent until the room is subscribed again
    await advance(1000);
    ws().drop(1006);
    assert.equal(a.sub.typing(), false);
    await advance(log.state.at(-1).delay);
    ws().welcome();
    assert.equal(a.sub.typing(), false);
    ws().confirmAll();
    assert.equal(a.sub.typing(), true);
    a.sub.unsubscribe();
    await advance(1000);
    assert.equal(a.sub.typing(), false, "ended");
    assert.deepEqual(ws().frames("typing"), [{ type: "typing", room: "roomA" }]);
    bridge.close();
  });

  test("typing signals received make typists, who expire after typingTimeout", async () => {
    const { bridge, ws } = await connect();
    const a = follow(bridge, "roomA", { presence: true });
    const b = follow(bridge, "roomB", { presence: true, typingTimeout: 1500 });
    ws().welcome().confirmAll(0);
    ws().typing("roomA", "u2"); // t = 0
    assert.deepEqual(a.sub.typists(), ["u2"]);
    await advance(2000);
    ws().typing("roomA", "u3"); // t = 2000
    await advance(2000);
    ws().typing("roomA", "u2"); // t = 4000: u2 again, no change
    assert.deepEqual(a.typing, ["u2", "u3", "u2"]);
    assert.deepEqual(a.typists, [["u2"], ["u2", "u3"]]);
    await advance(2999); // t = 6999
    assert.deepEqual(a.sub.typists(), ["u2", "u3"]);
    await advance(1); // t = 7000: u3 expires
    assert.deepEqual(a.sub.typists(), ["u2"]);
    assert.deepEqual(a.typists.at(-1), ["u2"]);
    await advance(1999);
    assert.deepEqual(a.sub.typists(), ["u2"]);
    await advance(1); // t = 9000: u2 too
    assert.deepEqual(a.typists, [["u2"], ["u2", "u3"], ["u2"], []]);
    assert.deepEqual(a.sub.typists(), []);
    // the window is an option
    ws().typing("roomB", "u4");
    await advance(1499);
    assert.deepEqual(b.sub.typists(), ["u4"]);
    await advance(1);
    assert.deepEqual(b.typists, [["u4"], []]);
    // going offline ends typing at once
    ws().typing("roomA", "u5").typing("roomA", "u6");
    ws().presence("roomA", "u5", false);
    assert.deepEqual(a.sub.typists(), ["u6"]);
    assert.deepEqual(a.typists.slice(-3), [["u5"], ["u5", "u6"], ["u6"]]);
    await advance(5000);
    assert.deepEqual(a.typists.at(-1), []);
    assert.equal(a.typists.length, 8);
    bridge.close();
  });

  test("presence and typing frames of rooms without presence are ignored", async () => {
    const { bridge, ws, log } = await connect();
    const a = follow(bridge, "roomA");
    ws().welcome().confirmAll(0);
    ws().presence("roomA", "u1").typing("roomA", "u1");
    ws().presence("roomX", "u1").typing("roomX", "u1"); // a room not followed
    assert.equal(a.sub.members.size, 0);
    assert.deepEqual(a.sub.typists(), []);
    assert.deepEqual([a.presence, a.typing, a.typists], [[], [], []]);
    assert.equal(log.error.length, 0);
    ws().event("roomA", 1);
    assert.deepEqual(a.events, [1]);
    bridge.close();
  });

  test("malformed presence and typing frames do not throw and change nothing", async () => {
    const { bridge, ws, log } = await connect();
    const a = follow(bridge, "roomA", { presence: true });
    ws().welcome().confirmAll(0);
    const bad = [
      { type: "presence" }, { type: "presence", room: "roomA" },
      { type: "presence", room: "roomA", user: 7, online: true },
      { type: "presence", room: "roomA", user: "", online: true },
      { type: "presence", room: "roomA", user: null, online: true },
      { type: "presence", room: "roomA", user: ["u1"], online: true },
      { type: "presence", room: "roomA", user: "u1" },
      { type: "presence", room: "roomA", user: "u1", online: "true" },
      { type: "presence", room: "roomA", user: "u1", online: 1 },
      { type: "presence", room: ["roomA"], user: "u1", online: true },
      { type: "presence", room: { a: 1 }, user: "u1", online: true },
      { type: "typing" }, { type: "typing", room: "roomA" },
      { type: "typing", room: "roomA", user: 3 }, { type: "typing", room: "roomA", user: {} },
      { type: "typing", room: null, user: "u1" },
    ];
    for (const frame of bad) assert.doesNotThrow(() => ws().recv(frame), JSON.stringify(frame));
    assert.equal(a.sub.members.size, 0);
    assert.deepEqual([a.presence, a.typing, a.typists], [[], [], []]);
    // ill-typed optional fields: the frame counts, the field does not
    ws().recv({ type: "presence", room: "roomA", user: "u1", online: false, status: 3,
      last_seen: 1700000000, custom_status: { html: "<b>" } });
    assert.deepEqual({ ...a.sub.members.get("u1") }, { room: "roomA", user: "u1", online: false,
      status: "offline", lastSeen: null, customStatus: null });
    assert.equal(log.error.length, 0);
    ws().presence("roomA", "u2").typing("roomA", "u2");
    assert.deepEqual(a.presence, [["u1", false], ["u2", true]]);
    assert.deepEqual(a.sub.typists(), ["u2"]);
    bridge.close();
  });

  test("a throwing presence callback does not stop the snapshot", async (t) => {
    const thrown = [];
    globalThis.reportError = (err) => thrown.push(err.message);
    t.after(() => { delete globalThis.reportError; });
    const { bridge, ws } = await connect();
    const sub = bridge.subscribe("roomA", { presence: true,
      onPresence: (p) => { if (p.user === "u1") throw new Error("app bug"); } });
    ws().welcome().confirmAll(0);
    ws().presence("roomA", "u1").presence("roomA", "u2");
    assert.deepEqual([...sub.members.keys()], ["u1", "u2"]);
    assert.deepEqual(thrown, ["app bug"]);
    bridge.close();
  });

  test("an ended subscription forgets its typists and gets no more callbacks", async () => {
    const { bridge, ws } = await connect();
    const a = follow(bridge, "roomA", { presence: true });
    ws().welcome().confirmAll(0);
    ws().typing("roomA", "u2").presence("roomA", "u2");
    a.sub.unsubscribe();
    assert.deepEqual(a.sub.typists(), []);
    ws().presence("roomA", "u2", false).typing("roomA", "u3");
    await advance(10_000);
    assert.deepEqual([a.presence, a.typists], [[["u2", true]], [["u2"]]]);
    assert.equal(a.sub.members.get("u2").online, true, "last known");
    bridge.close();
  });
});

test("close() leaves no typing timer behind (real clock)", async () => {
  const timers = () => process.getActiveResourcesInfo().filter((r) => r === "Timeout").length;
  const before = timers();
  const WebSocket = fakeWebSocket();
  const bridge = new PgBridge("ws://h.test/ws", { token: "t.o.k", WebSocket, fetch: null,
    pingInterval: 0 });
  const a = bridge.subscribe("roomA", { presence: true });
  const b = bridge.subscribe("roomB", { presence: true });
  await settle();
  const sock = WebSocket.instances[0].welcome().confirmAll(0);
  sock.typing("roomA", "u2").typing("roomB", "u3");
  a.unsubscribe(); // by unsubscribe()
  bridge.close(); // by close()
  await settle();
  assert.equal(timers(), before);
  assert.deepEqual([a.typists(), b.typists()], [[], []]);
});
