// Tokens and refusals: 4001, scheduled refresh, the handshake probe, fatal closes.
import { test, beforeEach, afterEach, mock } from "node:test";
import assert from "node:assert/strict";
import { tokenExpiry } from "../pgbridge.js";
import { NOW, advance, connect, fakeFetch, follow, jwt, useFakeTime } from "./fakes.mjs";

beforeEach(useFakeTime);
afterEach(() => mock.timers.reset());

/** A token function minting token n with exp = now + life seconds. */
function minter(life = 3600) {
  const mint = () => jwt({ sub: "u1", n: ++mint.calls, exp: Math.floor(Date.now() / 1000) + life });
  mint.calls = 0;
  return mint;
}

test("tokenExpiry reads exp from the payload, null when unreadable", () => {
  assert.equal(tokenExpiry(jwt({ sub: "u", exp: 1234 })), 1234);
  assert.equal(tokenExpiry(jwt({ sub: "u", exp: "1234" })), null);
  assert.equal(tokenExpiry(jwt({ sub: "u" })), null);
  assert.equal(tokenExpiry("not-a-jwt"), null);
  assert.equal(tokenExpiry("a.%%%.c"), null);
});

test("4001: a new token from the function, reconnect at once the first time", async () => {
  const token = minter();
  const { bridge, WS, ws, log } = await connect({ token });
  const a = follow(bridge, "roomA");
  ws().welcome().confirmAll(7);
  ws().event("roomA", 8);
  await advance(6000); // stable
  ws().drop(4001, "token expired");
  assert.equal(log.state.at(-1).delay, 0);
  await advance(0);
  assert.equal(WS.instances.length, 2);
  assert.equal(token.calls, 2);
  assert.notEqual(ws().token, WS.instances[0].token);
  ws().welcome();
  assert.equal(ws().frames("subscribe")[0].since, 8);
  ws().drop(4001, "token expired"); // again, within 5 s: backoff this time
  assert.ok(log.state.at(-1).delay > 0);
  bridge.close();
});

test("refresh: a new token sent refreshBefore seconds before exp, again for the next", async () => {
  const token = minter(3600);
  const { bridge, ws } = await connect({ token, refreshBefore: 60 });
  ws().welcome();
  await advance(3540_000 - 1);
  assert.equal(ws().frames("refresh").length, 0);
  await advance(1);
  const [r] = ws().frames("refresh");
  assert.equal(token.calls, 2);
  assert.equal(tokenExpiry(r.token), Math.floor(NOW / 1000) + 3540 + 3600);
  assert.ok(r.ref);
  await advance(3540_000);
  assert.equal(ws().frames("refresh").length, 2);
  bridge.close();
});

test("refresh: a function returning the same token is asked again later, not sent", async () => {
  const fixed = jwt({ sub: "u1", exp: Math.floor(NOW / 1000) + 120 });
  let calls = 0;
  const { bridge, ws } = await connect({ token: () => { calls++; return fixed; } });
  ws().welcome();
  await advance(60_000);
  assert.equal(calls, 2);
  await advance(30_000);
  assert.equal(calls, 3);
  assert.equal(ws().frames("refresh").length, 0);
  await advance(60_000); // expired: no more asking; the server will close with 4001
  const n = calls;
  await advance(600_000);
  assert.equal(calls, n);
  bridge.close();
});

test("refresh: none for a string token or a token without exp", async () => {
  const s = await connect({ token: jwt({ sub: "u1", exp: Math.floor(NOW / 1000) + 100 }) });
  s.ws().welcome();
  let calls = 0;
  const f = await connect({ token: () => { calls++; return jwt({ sub: "u1" }); } });
  f.ws().welcome();
  await advance(3600_000);
  assert.equal(s.ws().frames("refresh").length + f.ws().frames("refresh").length, 0);
  assert.equal(calls, 1);
  s.bridge.close();
  f.bridge.close();
});

test("refresh refused (unauthorized): close and reconnect with a fresh token", async () => {
  const token = minter(120);
  const { bridge, WS, ws, log } = await connect({ token });
  follow(bridge, "roomA", { since: 3 });
  ws().welcome().confirmAll();
  await advance(60_000);
  const sock = ws();
  const [r] = sock.frames("refresh");
  sock.recv({ type: "error", code: "unauthorized", message: "no", ref: r.ref, room: null });
  assert.equal(sock.closedWith.code, 4000);
  assert.equal(log.error.at(-1).code, "unauthorized");
  assert.equal(log.error.at(-1).fatal, false);
  await advance(log.state.at(-1).delay);
  assert.equal(WS.instances.length, 2);
  assert.equal(token.calls, 3);
  ws().welcome();
  assert.equal(ws().frames("subscribe")[0].since, 3);
  bridge.close();
});

test("refresh rate_limited: sent again after a delay", async () => {
  const token = minter(600);
  const { bridge, ws } = await connect({ token });
  ws().welcome();
  await advance(540_000);
  const [r] = ws().frames("refresh");
  ws().recv({ type: "error", code: "rate_limited", message: "slow", ref: r.ref, room: null });
  await advance(10_000);
  assert.equal(ws().frames("refresh").length, 2);
  bridge.close();
});

for (const [code, name] of [[1008, "policy_violation"], [1009, "message_too_big"],
  [4003, "user_deleted"], [1007, "invalid_payload"]]) {
  test(`close ${code} is fatal: ${name}, state closed, no retry`, async () => {
    const { bridge, WS, ws, log } = await connect();
    const a = follow(bridge, "roomA");
    ws().welcome().confirmAll();
    ws().drop(code, "why");
    assert.equal(bridge.state, "closed");
    assert.deepEqual(log.error.at(-1), { code: name, message: `closed by the server with ${code}: why`,
      closeCode: code, fatal: true });
    assert.deepEqual(log.state.at(-1), { state: "closed", code, reason: "why", attempt: 0, delay: null });
    assert.equal(a.sub.active, false);
    await advance(600_000);
    assert.equal(WS.instances.length, 1);
  });
}

test("refused before open, probe 426: the token is fine, plain backoff", async () => {
  const fetch = fakeFetch(426);
  const { bridge, WS, ws, log } = await connect({ fetch, token: "a.b.c" }, "wss://h.test/ws?v=1");
  ws().refuse();
  await advance(0);
  assert.deepEqual(fetch.calls.map((c) => c.url), ["https://h.test/ws?v=1&token=a.b.c&batch=0"]);
  assert.equal(log.state.at(-1).state, "reconnecting");
  await advance(log.state.at(-1).delay);
  assert.equal(WS.instances.length, 2);
  ws().welcome(); // opened: later drops do not probe
  ws().drop(1006);
  await advance(0);
  assert.equal(fetch.calls.length, 1);
  bridge.close();
});

test("probe 401 with a token function: one fresh token at once, then fatal unauthorized", async () => {
  const fetch = fakeFetch(401);
  const token = minter();
  const { bridge, WS, ws, log } = await connect({ fetch, token });
  ws().refuse();
  await advance(0); // the probe answers
  assert.equal(log.state.at(-1).delay, 0);
  await advance(0);
  assert.equal(WS.instances.length, 2);
  assert.equal(token.calls, 2);
  ws().refuse();
  await advance(0);
  assert.equal(bridge.state, "closed");
  assert.equal(log.error.at(-1).code, "unauthorized");
  assert.equal(log.error.at(-1).fatal, true);
  await advance(600_000);
  assert.equal(WS.instances.length, 2);
});

test("4001 with a string token: fatal unauthorized (it cannot be renewed)", async () => {
  const { bridge, WS, ws, log } = await connect({ token: "a.b.c" });
  ws().welcome();
  ws().drop(4001, "token expired");
  assert.equal(bridge.state, "closed");
  assert.deepEqual(log.error.map((e) => [e.code, e.closeCode, e.fatal]), [["unauthorized", 4001, true]]);
  await advance(60_000);
  assert.equal(WS.instances.length, 1);
});

test("a refused handshake seen as `error` only (Node 20) or `error` then `close`: once", async () => {
  const fetch = fakeFetch(426);
  const { bridge, WS, ws, log } = await connect({ fetch });
  ws().refuseNode20();
  await advance(0);
  assert.equal(fetch.calls.length, 1);
  assert.deepEqual(log.state.map((s) => [s.state, s.code]), [["reconnecting", 1006]]);
  await advance(log.state.at(-1).delay);
  ws().refuse(); // a browser: error, then close 1006
  await advance(0);
  assert.equal(fetch.calls.length, 2);
  assert.equal(log.state.length, 2);
  assert.equal(WS.instances.length, 2);
  bridge.close();
});

test("probe 401 with a string token: fatal at once", async () => {
  const { bridge, ws, log } = await connect({ fetch: fakeFetch(401), token: "a.b.c" });
  ws().refuse();
  await advance(0);
  assert.equal(bridge.state, "closed");
  assert.deepEqual(log.error.map((e) => [e.code, e.fatal, e.status]), [["unauthorized", true, 401]]);
});

test("probe 403: fatal forbidden_origin", async () => {
  const { bridge, ws, log } = await connect({ fetch: fakeFetch(403) });
  ws().refuse();
  await advance(0);
  assert.equal(bridge.state, "closed");
  assert.equal(log.error.at(-1).code, "forbidden_origin");
});

test("probe 429/503 honour Retry-After; fetch failure or status 0: plain backoff", async () => {
  const fetch = fakeFetch({ status: 503, headers: { "Retry-After": "7" } }, 429,
    new TypeError("CORS"), 0, 426);
  const { bridge, ws, log } = await connect({ fetch, random: () => 1 });
  const delays = [];
  for (let i = 0; i < 4; i++) {
    ws().refuse();
    await advance(0);
    delays.push(log.state.at(-1).delay);
    await advance(log.state.at(-1).delay);
  }
  assert.deepEqual(delays, [7000, 500, 1000, 2000]);
  assert.equal(bridge.state, "reconnecting");
  assert.ok(log.error.every((e) => !e.fatal));
  bridge.close();
});

test("a token function that fails: surfaced, retried with backoff", async () => {
  let n = 0;
  const token = async () => { if (++n < 3) throw new Error("auth server down"); return "a.b.c"; };
  const { bridge, WS, log } = await connect({ token });
  assert.equal(log.error[0].code, "token_unavailable");
  assert.equal(log.error[0].fatal, false);
  await advance(log.state.at(-1).delay);
  await advance(log.state.at(-1).delay);
  assert.equal(WS.instances.length, 1);
  assert.equal(n, 3);
  bridge.close();
});
