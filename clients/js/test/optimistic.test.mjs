// Optimistic sends (docs/howto/optimistic-send.md): sub.pending(id) resolves with the INSERT
// event of that row, whatever else arrives, and rejects on timeout, fail(), unsubscribe, close.
import { test, beforeEach, afterEach, mock } from "node:test";
import assert from "node:assert/strict";
import { advance, connect, follow, settle, useFakeTime } from "./fakes.mjs";

beforeEach(useFakeTime);
afterEach(() => mock.timers.reset());

/** A bridge following roomA, confirmed at `head`. */
async function following(head = 10) {
  const c = await connect();
  const a = follow(c.bridge, "roomA");
  c.ws().welcome().confirmAll(head);
  return { ...c, a };
}

/** Where a promise stands now: ["resolved", value], ["rejected", error] or ["pending"]. */
async function state(promise) {
  let out = ["pending"];
  promise.then((v) => { out = ["resolved", v]; }, (e) => { out = ["rejected", e]; });
  await settle();
  return out;
}

test("resolves with the row's INSERT event, its seq the receipt's, not with other events", async () => {
  const { bridge, ws, a } = await following();
  const id = "01JOPTIMISTIC0000000000001";
  const confirmed = a.sub.pending(id);
  assert.equal(a.sub.pending(id), confirmed, "the same promise for the same id");
  ws().event("roomA", 11, { id: "someone-else" });
  ws().event("roomA", 12, { id, op: "UPDATE" }); // not its INSERT
  ws().event("roomB", 13, { id }); // another room
  assert.deepEqual(await state(confirmed), ["pending"]);
  ws().event("roomA", 14, { id, data: { content: "hi" } });
  const [how, event] = await state(confirmed);
  assert.equal(how, "resolved");
  assert.deepEqual([event.room, event.seq, event.op, event.id, event.data.content],
    ["roomA", 14, "INSERT", id, "hi"]);
  assert.deepEqual(a.events, [11, 12, 14], "every event still reaches onEvent, once");
  bridge.close();
});

test("an INSERT that arrived just before pending() was called still resolves it", async () => {
  const { bridge, ws, a } = await following();
  const early = a.sub.pending("first"); // the first pending() starts remembering INSERTs
  ws().event("roomA", 11, { id: "first" }).event("roomA", 12, { id: "raced" });
  assert.equal((await state(early))[0], "resolved");
  const [how, event] = await state(a.sub.pending("raced"));
  assert.deepEqual([how, event.seq], ["resolved", 12]);
  for (let seq = 13; seq < 13 + 256; seq++) ws().event("roomA", seq, { id: `x${seq}` });
  const [late] = await state(a.sub.pending("raced", { timeout: 100 }));
  assert.equal(late, "pending", "only the last 256 INSERTs are remembered");
  await advance(100);
  bridge.close();
});

test("rejects with code timeout when the event does not come in time", async () => {
  const { bridge, ws, a } = await following();
  const p = a.sub.pending("lost", { timeout: 5000 });
  await advance(4999);
  assert.deepEqual(await state(p), ["pending"]);
  await advance(1);
  const [how, err] = await state(p);
  assert.deepEqual([how, err.code, err.room, err.id], ["rejected", "timeout", "roomA", "lost"]);
  ws().event("roomA", 11, { id: "lost" }); // too late: nothing to settle, nothing thrown
  assert.deepEqual(a.events, [11]);
  bridge.close();
});

test("fail(id) rejects with code failed and the reason as cause, once", async () => {
  const { bridge, a } = await following();
  const p = a.sub.pending("m1", { timeout: Infinity });
  const reason = new Error("HTTP 500");
  assert.equal(a.sub.fail("m1", reason), true);
  assert.equal(a.sub.fail("m1", reason), false, "no longer pending");
  assert.equal(a.sub.fail("never", reason), false);
  const [how, err] = await state(p);
  assert.deepEqual([how, err.code, err.cause], ["rejected", "failed", reason]);
  bridge.close();
});

test("the end of the subscription or of the bridge rejects what is pending", async () => {
  const { bridge, ws, a } = await following();
  const b = follow(bridge, "roomB");
  ws().confirmAll(3);
  const onA = a.sub.pending("a1");
  a.sub.unsubscribe();
  assert.equal((await state(onA))[1].code, "unsubscribed");
  assert.equal((await state(a.sub.pending("a2")))[1].code, "unsubscribed");
  const revoked = b.sub.pending("b1");
  ws().recv({ type: "unsubscribed", room: "roomB", reason: "membership_revoked" });
  assert.equal((await state(revoked))[1].code, "unsubscribed");
  const c = follow(bridge, "roomC");
  const onC = c.sub.pending("c1");
  bridge.close();
  assert.equal((await state(onC))[1].code, "closed");
});

test("survives a reconnect: the resumed INSERT resolves it", async () => {
  const { bridge, ws, log, a } = await following(10);
  const p = a.sub.pending("m11");
  ws().drop(1006);
  await advance(log.state.at(-1).delay);
  ws().welcome();
  assert.equal(ws().frames("subscribe").at(-1).since, 10);
  ws().confirmAll(11);
  ws().event("roomA", 11, { id: "m11" });
  assert.equal((await state(p))[1].seq, 11);
  bridge.close();
});

test("refuses an empty id or a bad timeout", async () => {
  const { bridge, a } = await following();
  assert.throws(() => a.sub.pending(""), TypeError);
  assert.throws(() => a.sub.pending(42), TypeError);
  for (const timeout of [-1, NaN, "5"]) {
    assert.throws(() => a.sub.pending("x", { timeout }), TypeError);
  }
  bridge.close();
});

test("a row already in the room's snapshot resolves its pending id, not a timeout", async () => {
  // The app subscribes with a snapshot and sends at once: a write committed before the
  // snapshot's read is in the snapshot and never comes as an event.
  const { bridge, ws } = await connect();
  const a = follow(bridge, "roomA", { snapshot: 5 });
  const p = a.sub.pending("sent-early", { timeout: 5000 });
  ws().welcome();
  const [sub] = ws().frames("subscribe");
  ws().recv({ type: "subscribed", room: "roomA", from: 7, head: 7, ref: sub.ref });
  const row = { id: "sent-early", channel_id: "roomA", content: "hi" };
  ws().recv({ type: "snapshot", room: "roomA", seq: 7, truncated: false, ref: sub.ref,
    messages: [{ id: "older" }, row] });
  let outcome = ["pending"];
  p.then((v) => { outcome = ["resolved", v]; }, (e) => { outcome = ["rejected", e]; });
  await advance(5000);
  await settle();
  const [how, got] = outcome;
  assert.equal(how, "resolved", `rejected: ${got?.code}`);
  assert.deepEqual({ ...got }, { type: "snapshot", room: "roomA", seq: 7, table: "messages",
    op: "INSERT", id: "sent-early", data: row });
  bridge.close();
});
