// Snapshot then live (PROTOCOL.md): `snapshot: N` on the first subscribe, the `snapshot` frame
// to onSnapshot, then events; a resubscribe resumes with `since`, or asks again if the drop
// came before the snapshot.
import { test, beforeEach, afterEach, mock } from "node:test";
import assert from "node:assert/strict";
import { advance, connect, follow, useFakeTime } from "./fakes.mjs";

const snapshotFrame = (room, seq, messages) => ({ type: "snapshot", room, seq, truncated: false,
  ref: "s1", messages });

test.describe("with a mocked clock", () => {
  beforeEach(useFakeTime);
  afterEach(() => mock.timers.reset());

  test("the snapshot arrives once, then events after its seq, then a resume with since", async () => {
    const { bridge, ws, log } = await connect();
    const snaps = [];
    const a = follow(bridge, "roomA", { snapshot: 3, onSnapshot: (s) => snaps.push(s) });
    ws().welcome();
    const [sub] = ws().frames("subscribe");
    assert.equal(sub.snapshot, 3);
    assert.ok(!("since" in sub));
    ws().recv({ type: "subscribed", room: "roomA", from: 7, head: 7, ref: sub.ref });
    ws().recv(snapshotFrame("roomA", 7, [{ id: "m6" }, { id: "m7" }]));
    ws().event("roomA", 7).event("roomA", 8);
    assert.deepEqual(snaps, [{ room: "roomA", seq: 7, messages: [{ id: "m6" }, { id: "m7" }],
      truncated: false }]);
    assert.deepEqual(a.events, [8]);
    assert.equal(a.sub.lastSeq, 8);
    ws().recv(snapshotFrame("roomA", 9, [])); // a second one is not ours: ignored
    assert.equal(snaps.length, 1);
    ws().drop(1006);
    await advance(log.state.at(-1).delay);
    ws().welcome();
    const [again] = ws().frames("subscribe");
    assert.equal(again.since, 8);
    assert.ok(!("snapshot" in again));
    bridge.close();
  });

  test("a drop between subscribed and the snapshot asks for the snapshot again", async () => {
    const { bridge, ws, log } = await connect();
    const snaps = [];
    const a = follow(bridge, "roomA", { snapshot: 2, onSnapshot: (s) => snaps.push(s.seq) });
    ws().welcome();
    ws().recv({ type: "subscribed", room: "roomA", from: 4, head: 4,
      ref: ws().frames("subscribe")[0].ref });
    assert.equal(a.sub.lastSeq, null);
    ws().drop(1006);
    await advance(log.state.at(-1).delay);
    ws().welcome();
    const [again] = ws().frames("subscribe");
    assert.equal(again.snapshot, 2);
    ws().recv({ type: "subscribed", room: "roomA", from: 5, head: 5, ref: again.ref });
    ws().recv(snapshotFrame("roomA", 5, []));
    assert.deepEqual(snaps, [5]);
    assert.equal(a.sub.lastSeq, 5);
    bridge.close();
  });

  test("a bad snapshot option is a TypeError", async () => {
    const { bridge } = await connect();
    for (const snapshot of [0, -1, 1.5, "3", true]) {
      assert.throws(() => bridge.subscribe("roomA", { snapshot }), TypeError);
    }
    assert.throws(() => bridge.subscribe("roomA", { snapshot: 3, since: 1 }), TypeError);
    bridge.close();
  });
});
