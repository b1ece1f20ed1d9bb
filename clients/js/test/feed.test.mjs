// One feed per user (PROTOCOL.md): bridge.feed() keeps every room of the user with head, acked
// and unread current, hands over the events of the rooms no subscription holds, follows joins
// and leaves, acks, and starts again from a fresh answer after a reconnect.
import { test, beforeEach, afterEach, mock } from "node:test";
import assert from "node:assert/strict";
import { advance, connect, eventFrame, follow, useFakeTime } from "./fakes.mjs";

beforeEach(useFakeTime);
afterEach(() => mock.timers.reset());

const ME = "u1"; // the user of the fake welcome
const room = (r, head, acked = 0, unread = 0) => ({ room: r, head, acked, unread });
const post = (r, seq, user = "u2", extra = {}) => eventFrame(r, seq,
  { data: { id: `m${seq}`, channel_id: r, user_id: user, content: `hi ${seq}` }, ...extra });
const entries = (feed) => Object.fromEntries([...feed.rooms].map(([r, e]) => [r, { ...e }]));

/** A bridge with a feed, recording what the feed's callbacks get. */
function withFeed(bridge) {
  const got = { feeds: [], events: [], joins: [], leaves: [], updates: [], errors: [] };
  const feed = bridge.feed({
    onFeed: (rooms) => got.feeds.push(Object.fromEntries([...rooms].map(([r, e]) => [r, { ...e }]))),
    onEvent: (e) => got.events.push([e.room, e.seq]),
    onJoin: (r, e) => got.joins.push([r, e.seq, e.table]),
    onLeave: (r, reason) => got.leaves.push([r, reason]),
    onUpdate: (r, e) => got.updates.push([r, e.head, e.acked, e.unread]),
    onError: (e) => got.errors.push(e),
  });
  return Object.assign(got, { feed });
}

/** Answer the last `feed` request sent. */
function answer(ws, ...rooms) {
  const ref = ws.frames("feed").at(-1).ref;
  return ws.recv({ type: "feed", ref, rooms });
}

test("the answer fills rooms; events move head and count other users' messages", async () => {
  const { bridge, ws } = await connect();
  const f = withFeed(bridge);
  assert.equal(ws().frames("feed").length, 0, "sent on the welcome");
  ws().welcome();
  assert.equal(bridge.user, ME);
  assert.equal(ws().frames("feed").length, 1);
  ws().event("roomA", 9, { room: "roomA" }); // before the answer: not the feed's yet
  answer(ws(), room("roomA", 7, 5, 2), room("roomB", 0));
  assert.deepEqual(f.feeds, [{ roomA: { head: 7, acked: 5, unread: 2 },
    roomB: { head: 0, acked: 0, unread: 0 } }]);
  ws().recv(post("roomA", 8)) // another user's message: unread
    .recv(post("roomA", 9, ME)) // my own: not unread
    .recv(post("roomA", 10, "u2", { op: "UPDATE" })) // an edit: not unread
    .recv(eventFrame("roomA", 11, { table: "reactions", data: { user_id: "u2" } }))
    .recv(post("roomA", 12, "u3", { data: { user_id: "u3", deleted_at: "2026-01-01" } }))
    .recv(post("roomB", 1, "u3"))
    .recv(post("roomA", 8)); // a resend
  assert.deepEqual(f.events, [["roomA", 8], ["roomA", 9], ["roomA", 10], ["roomA", 11],
    ["roomA", 12], ["roomB", 1]]);
  assert.deepEqual(entries(f.feed), { roomA: { head: 12, acked: 5, unread: 3 },
    roomB: { head: 1, acked: 0, unread: 1 } });
  assert.deepEqual(f.updates.slice(0, 2), [["roomA", 8, 5, 3], ["roomA", 9, 5, 3]]);
  assert.ok(Object.isFrozen(f.feed.rooms.get("roomA")));
  assert.equal(typeof f.feed.rooms.set, "undefined", "read-only");
  bridge.close();
  assert.equal(f.feed.active, false);
});

test("ack: acked at once, unread 0 once it reaches head; sent batched", async () => {
  const { bridge, ws } = await connect({ ackInterval: 1000 });
  const f = withFeed(bridge);
  ws().welcome();
  answer(ws(), room("roomA", 7, 5, 2), room("roomB", 3, 0, 3));
  f.feed.ack("roomB", 2); // not up to head: the unread count stays (which of them is unknown)
  assert.deepEqual(entries(f.feed).roomB, { head: 3, acked: 2, unread: 3 });
  f.feed.ack("roomA", 7);
  assert.deepEqual(entries(f.feed).roomA, { head: 7, acked: 7, unread: 0 });
  f.feed.ack("roomA", 6); // below acked: nothing
  assert.throws(() => f.feed.ack("roomA", 8), RangeError, "past head");
  assert.throws(() => f.feed.ack("roomZ", 1), RangeError, "not a room of the feed");
  assert.throws(() => f.feed.ack("roomA", -1), RangeError);
  assert.equal(ws().frames("ack").length, 0);
  await advance(1000);
  assert.deepEqual(ws().frames("ack").map((a) => [a.room, a.seq]), [["roomB", 2], ["roomA", 7]]);
  ws().recv(post("roomA", 8));
  assert.deepEqual(entries(f.feed).roomA, { head: 8, acked: 7, unread: 1 });
  bridge.close();
});

test("a join: the first event of an unknown room adds it with acked 0; a leave removes it",
  async () => {
    const { bridge, ws } = await connect();
    const f = withFeed(bridge);
    ws().welcome();
    answer(ws(), room("roomA", 1));
    const join = eventFrame("roomN", 4, { table: "channel_members", id: `roomN:${ME}`,
      data: { channel_id: "roomN", user_id: ME } });
    ws().recv(join).recv(post("roomN", 5));
    assert.deepEqual(f.joins, [["roomN", 4, "channel_members"]]);
    assert.deepEqual(f.events, [["roomN", 4], ["roomN", 5]]);
    assert.deepEqual(entries(f.feed).roomN, { head: 5, acked: 0, unread: 1 });
    ws().recv({ type: "unsubscribed", room: "roomN", reason: "membership_revoked" });
    ws().recv({ type: "unsubscribed", room: "roomA", reason: "room_deleted" });
    assert.deepEqual(f.leaves, [["roomN", "membership_revoked"], ["roomA", "room_deleted"]]);
    assert.equal(f.feed.rooms.size, 0);
    assert.throws(() => f.feed.ack("roomN", 5), RangeError);
    ws().recv(join); // joined again later: a room again
    assert.deepEqual(f.joins.length, 2);
    assert.equal(f.feed.active, true);
    bridge.close();
  });

test("a reconnect sends the subscribes, then the feed again; its answer replaces rooms",
  async () => {
    const { bridge, ws, log } = await connect({ ackInterval: 1000 });
    const f = withFeed(bridge);
    ws().welcome();
    answer(ws(), room("roomA", 7, 5, 2), room("roomB", 3));
    ws().recv(post("roomA", 8));
    f.feed.ack("roomA", 8); // not sent before the drop
    ws().drop(1006);
    assert.deepEqual(entries(f.feed).roomA, { head: 8, acked: 8, unread: 0 }, "as last known");
    await advance(log.state.at(-1).delay);
    follow(bridge, "roomS", { since: 2 });
    ws().welcome();
    assert.deepEqual(ws().sent.map((x) => x.type), ["subscribe", "feed"]);
    ws().recv(post("roomB", 9)); // before the answer: dropped
    answer(ws(), room("roomA", 12, 5, 4), room("roomC", 2, 1, 1)); // the server missed the ack
    assert.deepEqual(f.feeds.at(-1), { roomA: { head: 12, acked: 8, unread: 4 },
      roomC: { head: 2, acked: 1, unread: 1 } }, "the ack not sent yet still holds");
    assert.deepEqual(entries(f.feed), f.feeds.at(-1));
    await advance(1000);
    assert.deepEqual(ws().frames("ack"), [{ type: "ack", room: "roomA", seq: 8 }]);
    ws().recv(post("roomA", 13));
    assert.deepEqual(f.events, [["roomA", 8], ["roomA", 13]]);
    bridge.close();
  });

test("a subscribe takes a room over: its events reach the subscription only, then the feed",
  async () => {
    const { bridge, ws } = await connect({ ackInterval: 1000 });
    const f = withFeed(bridge);
    ws().welcome();
    answer(ws(), room("roomA", 5, 3, 2), room("roomB", 1));
    ws().recv(post("roomA", 6));
    const s = follow(bridge, "roomA", { presence: true });
    const sent = ws().frames("subscribe").at(-1);
    assert.equal(sent.since, 6, "after what the feed delivered");
    ws().recv(post("roomA", 7)); // the server sent it through the feed before the subscribe:
    ws().confirmAll(7); // the subscription's replay brings it, once
    ws().recv(post("roomA", 7)).recv(post("roomA", 8)).recv(post("roomB", 2));
    assert.deepEqual(s.events, [7, 8]);
    assert.deepEqual(f.events, [["roomA", 6], ["roomB", 2]]);
    assert.deepEqual(entries(f.feed).roomA, { head: 8, acked: 8, unread: 0 },
      "kept current, acked by the subscription's auto-ack");
    // unsubscribe gives the room back: events in flight for the subscription, then the feed's
    s.sub.unsubscribe();
    ws().recv(post("roomA", 8)) // a resend of one the subscription delivered
      .recv({ type: "unsubscribed", room: "roomA", reason: "client",
        ref: ws().frames("unsubscribe").at(-1).ref })
      .recv(post("roomA", 9));
    assert.deepEqual(s.events, [7, 8]);
    assert.deepEqual(f.events, [["roomA", 6], ["roomB", 2], ["roomA", 9]]);
    assert.deepEqual(entries(f.feed).roomA, { head: 9, acked: 8, unread: 1 });
    // with `since` the application chooses: the subscription replays from there
    const again = follow(bridge, "roomA", { since: 0, autoAck: false });
    assert.equal(ws().frames("subscribe").at(-1).since, 0);
    ws().confirmAll(9);
    for (let seq = 1; seq <= 10; seq++) ws().recv(post("roomA", seq));
    assert.deepEqual(again.events, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    assert.deepEqual(entries(f.feed).roomA, { head: 10, acked: 8, unread: 2 });
    again.sub.ack(10);
    assert.deepEqual(entries(f.feed).roomA, { head: 10, acked: 10, unread: 0 });
    bridge.close();
  });

test("a room held by a subscription that the user leaves ends both", async () => {
  const { bridge, ws } = await connect();
  const f = withFeed(bridge);
  ws().welcome();
  answer(ws(), room("roomA", 5));
  const s = follow(bridge, "roomA");
  ws().confirmAll(5);
  ws().recv({ type: "unsubscribed", room: "roomA", reason: "membership_revoked" });
  assert.equal(s.sub.active, false);
  assert.equal(s.errors[0].code, "membership_revoked");
  assert.deepEqual(f.leaves, [["roomA", "membership_revoked"]]);
  bridge.close();
});

test("a subscription's cursor_expired ends it and leaves the room to the feed", async () => {
  const { bridge, ws } = await connect();
  const f = withFeed(bridge);
  ws().welcome();
  answer(ws(), room("roomA", 5));
  const s = follow(bridge, "roomA");
  ws().confirmAll(5);
  ws().recv({ type: "unsubscribed", room: "roomA", reason: "cursor_expired" });
  assert.equal(s.sub.active, false);
  assert.deepEqual(f.leaves, []);
  ws().recv({ type: "unsubscribed", room: "roomA", reason: "cursor_expired" }); // the feed's
  assert.deepEqual(f.leaves, [["roomA", "cursor_expired"]]);
  bridge.close();
});

test("one feed per bridge; a refusal that passes is sent again, another ends it",
  async () => {
    const { bridge, ws, log } = await connect({ random: () => 1 });
    const f = withFeed(bridge);
    assert.throws(() => bridge.feed(), /already has a feed/);
    ws().welcome();
    const first = ws().frames("feed").at(-1);
    ws().recv({ type: "error", code: "rate_limited", message: "slow down", ref: first.ref });
    assert.deepEqual(f.errors.map((e) => [e.code, e.feed, e.fatal]), [["rate_limited", true, false]]);
    await advance(249);
    assert.equal(ws().frames("feed").length, 1);
    await advance(1);
    const second = ws().frames("feed").at(-1);
    assert.notEqual(second.ref, first.ref);
    ws().recv({ type: "error", code: "bad_request", message: "no", ref: second.ref });
    assert.equal(f.feed.active, false);
    assert.deepEqual(log.error.map((e) => [e.code, e.feed, e.fatal]),
      [["rate_limited", true, false], ["bad_request", true, true]]);
    assert.equal(bridge.state, "open", "the bridge carries on");
    const g = withFeed(bridge); // ended: the application may ask again
    answer(ws(), room("roomA", 1));
    assert.equal(g.feed.rooms.size, 1);
    assert.equal(f.feed.rooms.size, 0);
    f.feed.ack("roomA", 1); // the ended feed's: nothing, to the new one neither
    assert.equal(g.feed.rooms.get("roomA").acked, 0);
    bridge.close();
  });

test("a feed frame dropped by the frame rate limit is sent again; the duplicate's refusal is "
  + "ignored", async () => {
  const { bridge, ws, log } = await connect({ random: () => 1 });
  const f = withFeed(bridge);
  ws().welcome();
  const [first] = ws().frames("feed");
  ws().recv({ type: "error", code: "rate_limited", message: "slow down", ref: null, room: null });
  await advance(250);
  const [, second] = ws().frames("feed");
  ws().recv({ type: "feed", ref: first.ref, rooms: [room("roomA", 2)] });
  ws().recv({ type: "error", code: "bad_request", message: "one feed", ref: second.ref });
  assert.equal(f.feed.active, true);
  assert.equal(f.feeds.length, 1);
  assert.deepEqual(log.error.map((e) => e.code), ["rate_limited"]);
  bridge.close();
});

test("a throwing callback breaks neither the feed nor the bridge", async (t) => {
  const { bridge, ws } = await connect();
  const seen = [];
  const thrown = [];
  globalThis.reportError = (err) => thrown.push(err.message); // as in a browser
  t.after(() => { delete globalThis.reportError; });
  bridge.feed({
    onUpdate: () => { throw new Error("update bug"); },
    onEvent: (e) => { seen.push(e.seq); throw new Error("event bug"); },
  });
  ws().welcome();
  answer(ws(), room("roomA", 0));
  ws().recv(post("roomA", 1)).recv(post("roomA", 2));
  assert.deepEqual(seen, [1, 2]);
  assert.deepEqual(thrown, ["update bug", "event bug", "update bug", "event bug"]);
  bridge.close();
});

test("a subscribe with `snapshot` to a room of the feed asks for it, not for `since`",
  async () => {
    const { bridge, ws } = await connect();
    withFeed(bridge);
    ws().welcome();
    answer(ws(), room("roomA", 5));
    follow(bridge, "roomA", { snapshot: 20 });
    const sent = ws().frames("subscribe").at(-1);
    assert.equal(sent.snapshot, 20);
    assert.ok(!("since" in sent));
    bridge.close();
  });

test("close() sends the feed's pending acks first", async () => {
  const { bridge, ws } = await connect({ ackInterval: 60_000 });
  const f = withFeed(bridge);
  ws().welcome();
  answer(ws(), room("roomA", 5, 0, 5));
  f.feed.ack("roomA", 5);
  const socket = ws();
  bridge.close();
  assert.deepEqual(socket.frames("ack"), [{ type: "ack", room: "roomA", seq: 5 }]);
  assert.equal(f.feed.active, false);
});

test("events the feed sent while a subscribe was pending are the feed's if it is refused",
  async () => {
    const { bridge, ws } = await connect();
    const f = withFeed(bridge);
    ws().welcome();
    answer(ws(), room("roomA", 5));
    const s = follow(bridge, "roomA", { since: 0 });
    const sent = ws().frames("subscribe").at(-1);
    ws().recv(post("roomA", 6)).recv(post("roomA", 7)); // the feed's: the subscribe waits
    assert.deepEqual(f.events, []);
    ws().recv({ type: "error", code: "cursor_expired", message: "gone", ref: sent.ref,
      room: "roomA" });
    assert.equal(s.sub.active, false);
    assert.deepEqual(f.events, [["roomA", 6], ["roomA", 7]], "no gap in the feed");
    ws().recv(post("roomA", 7)).recv(post("roomA", 8));
    assert.deepEqual(f.events, [["roomA", 6], ["roomA", 7], ["roomA", 8]]);
    assert.deepEqual(s.events, []);
    bridge.close();
  });

test("a subscribe confirmed after the feed's events: they come once, through it", async () => {
  const { bridge, ws } = await connect();
  const f = withFeed(bridge);
  ws().welcome();
  answer(ws(), room("roomA", 5));
  const s = follow(bridge, "roomA");
  ws().recv(post("roomA", 6)); // sent by the feed before the server took the room over
  ws().confirmAll(6);
  ws().recv(post("roomA", 6)).recv(post("roomA", 7)); // the subscription's replay, then live
  assert.deepEqual(s.events, [6, 7]);
  assert.deepEqual(f.events, []);
  s.sub.unsubscribe(); // nothing held is handed over twice
  ws().recv(post("roomA", 8));
  assert.deepEqual(f.events, [["roomA", 8]]);
  bridge.close();
});

test("unread: a message it counted that is deleted or soft-deleted counts no more; a partial "
  + "ack reads the ones it counted up to there", async () => {
  const { bridge, ws } = await connect();
  const f = withFeed(bridge);
  ws().welcome();
  answer(ws(), room("roomA", 10, 4, 3)); // three unread before seq 10, which ones unknown
  ws().recv(post("roomA", 11)).recv(post("roomA", 12)).recv(post("roomA", 13))
    .recv(post("roomA", 14));
  assert.equal(f.feed.rooms.get("roomA").unread, 7);
  ws().recv(eventFrame("roomA", 15, { op: "UPDATE", id: "m12",
    data: { id: "m12", user_id: "u2", deleted_at: "2026-01-01T00:00:01+00:00" } }));
  ws().recv(eventFrame("roomA", 16, { op: "DELETE", id: "m13", data: { id: "m13" } }));
  assert.equal(f.feed.rooms.get("roomA").unread, 5, "two of its own counted no more");
  ws().recv(eventFrame("roomA", 17, { op: "DELETE", id: "m8", data: { id: "m8" } }))
    .recv(eventFrame("roomA", 18, { op: "UPDATE", id: "m11", data: { id: "m11", user_id: "u2",
      content: "edited" } }));
  assert.equal(f.feed.rooms.get("roomA").unread, 5, "one counted by the server: unknown; an edit");
  f.feed.ack("roomA", 12); // reads m11 (its own count); the three before 10 stay unknown
  assert.deepEqual(entries(f.feed).roomA, { head: 18, acked: 12, unread: 4 });
  f.feed.ack("roomA", 18);
  assert.deepEqual(entries(f.feed).roomA, { head: 18, acked: 18, unread: 0 });
  ws().recv(eventFrame("roomA", 19, { op: "DELETE", id: "m14", data: { id: "m14" } }));
  assert.equal(f.feed.rooms.get("roomA").unread, 0, "read already: nothing to take back");
  bridge.close();
});
