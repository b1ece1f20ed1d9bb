// The React hooks' shared store (react.js) driven through a stand-in for React
// (fake_react.mjs) and the scripted WebSocket: what each hook asks of the wire, and what the
// store keeps once no hook holds it. Their behaviour in React 18 and 19, in Chromium, against
// a real daemon: tests/integration/test_react_hooks.py. (The "react" import is mapped with
// module.register, Node >= 20.6; the mocked Date of fakes.mjs already needs 20.11.)
import { test, beforeEach, afterEach, mock } from "node:test";
import assert from "node:assert/strict";
import { register } from "node:module";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { advance, connect, settle, useFakeTime } from "./fakes.mjs";

const fakeReact = new URL("./fake_react.mjs", import.meta.url).href;
register("data:text/javascript," + encodeURIComponent(`export async function resolve(s, c, next) {
  return s === "react" ? { url: ${JSON.stringify(fakeReact)}, shortCircuit: true } : next(s, c);
}`));
const { render } = await import("./fake_react.mjs");
const { usePresence, useRoom } = await import("../react.js");

beforeEach(useFakeTime);
afterEach(() => mock.timers.reset());

const row = (id) => ({ id, channel_id: "roomA", user_id: "u2", content: id,
  created_at: "2026-01-01T00:00:00+00:00", updated_at: "2026-01-01T00:00:00+00:00",
  deleted_at: null, metadata: null });

/** A bridge, welcomed, whose room "roomA" is followed by `hooks` (functions of the bridge,
 * rendered as components); `answer()` answers each subscribe not answered yet (head 10, and a
 * snapshot to those asking), as it does for the first. */
async function mounted(...hooks) {
  const conn = await connect({ ackInterval: 100 });
  conn.ws().welcome();
  const parts = hooks.map((hook) => render(() => hook(conn.bridge)));
  await settle();
  conn.answer = () => {
    const asked = conn.ws().frames("subscribe").filter((f) => !f.answered);
    conn.ws().confirmAll(10);
    for (const f of asked) {
      if (f.snapshot) {
        conn.ws().recv({ type: "snapshot", room: "roomA", seq: 10, truncated: false, ref: f.ref,
          messages: [row("m9"), row("m10")] });
      }
    }
  };
  conn.answer();
  await settle();
  return { ...conn, parts };
}

test("useRoom unmounted, usePresence stays: the room is no longer acknowledged", async () => {
  const { bridge, ws, parts: [room, members], answer } = await mounted(
    (b) => useRoom(b, "roomA", { snapshot: 2 }), (b) => usePresence(b, "roomA"));
  assert.deepEqual(room.value.messages.map((m) => m.id), ["m9", "m10"]);
  ws().event("roomA", 11, { id: "m11", data: row("m11") });
  await advance(100);
  assert.deepEqual(ws().frames("ack").map((f) => f.seq), [11]); // shown: read
  room.unmount();
  await settle();
  answer();
  ws().event("roomA", 12, { id: "m12", data: row("m12") });
  await advance(1000);
  // nobody shows the room's messages any more: m12 is not read
  assert.deepEqual(ws().frames("ack").map((f) => f.seq), [11]);
  assert.equal(members.value.status, "live");
  members.unmount();
  bridge.close();
});

test("once no hook holds a room, the store keeps none of its rows", async () => {
  setFlagsFromString("--expose-gc");
  const gc = runInNewContext("gc");
  const { bridge, ws, parts: [room] } = await mounted(
    (b) => useRoom(b, "roomA", { snapshot: 2 }));
  ws().event("roomA", 11, { id: "m11", data: row("m11") });
  await settle();
  const held = new WeakRef(room.value.messages.at(-1));
  assert.equal(held.deref().id, "m11");
  room.unmount();
  room.value = null;
  await settle();
  gc();
  await settle();
  assert.equal(held.deref(), undefined, "the rows of a room no hook holds are kept");
  bridge.close();
});

test("an event whose row has no string id is left out of useRoom, as the snapshot's are", async () => {
  const { bridge, ws, parts: [room] } = await mounted(
    (b) => useRoom(b, "roomA", { snapshot: 2 }));
  ws().event("roomA", 11, { id: "m11", data: [1] });
  ws().event("roomA", 12, { id: "m12", data: { ...row("m12"), id: 12 } });
  ws().event("roomA", 13, { id: "m13", data: row("m13") });
  await settle();
  assert.deepEqual(room.value.messages.map((m) => m.id), ["m9", "m10", "m13"]);
  room.unmount();
  bridge.close();
});
