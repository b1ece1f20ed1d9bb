// A connection attempt that fails before the WebSocket opens: the `error` event
// `connect_failed` (not fatal) with its cause, once per attempt, while the bridge retries.
import { test, beforeEach, afterEach, mock } from "node:test";
import assert from "node:assert/strict";
import { advance, connect, fakeFetch, follow, systemError, useFakeTime } from "./fakes.mjs";

beforeEach(useFakeTime);
afterEach(() => mock.timers.reset());

const failures = (log) => log.error.filter((e) => e.code === "connect_failed");

test("refused (Node's ws: ECONNREFUSED): an error per attempt, not fatal, retried", async () => {
  const fetch = fakeFetch(426); // not asked: the error says why
  const { bridge, WS, ws, log } = await connect({ fetch });
  for (let i = 0; i < 3; i++) {
    ws().refuse(systemError("ECONNREFUSED"));
    await advance(0);
    assert.equal(bridge.state, "reconnecting");
    await advance(log.state.at(-1).delay);
  }
  assert.equal(fetch.calls.length, 0);
  assert.deepEqual(failures(log).map((e) => [e.cause, e.errno, e.attempt, e.fatal]), [
    ["refused", "ECONNREFUSED", 0, false], ["refused", "ECONNREFUSED", 1, false],
    ["refused", "ECONNREFUSED", 2, false]]);
  assert.match(failures(log)[0].message,
    /^cannot connect to ws:\/\/bridge.test\/ws: connection refused \(ECONNREFUSED\); retrying$/);
  assert.ok(!failures(log)[0].message.includes("token"));
  // the error comes before the state that announces the retry and its delay
  assert.deepEqual(log.state.map((s) => s.attempt), [1, 2, 3]);
  assert.equal(WS.instances.length, 4);
  bridge.close();
});

test("each network and TLS error code has its cause", async () => {
  const cases = [["ENOTFOUND", "unreachable"], ["EHOSTUNREACH", "unreachable"],
    ["ENETUNREACH", "unreachable"], ["ETIMEDOUT", "timeout"], ["ECONNRESET", "reset"],
    ["CERT_HAS_EXPIRED", "tls"], ["DEPTH_ZERO_SELF_SIGNED_CERT", "tls"],
    ["UNABLE_TO_VERIFY_LEAF_SIGNATURE", "tls"], ["ERR_TLS_CERT_ALTNAME_INVALID", "tls"],
    ["ERR_SSL_WRONG_VERSION_NUMBER", "tls"]];
  const { bridge, ws, log } = await connect({ random: () => 0 });
  for (const [code] of cases) {
    ws().refuse(systemError(code));
    await advance(0);
    await advance(log.state.at(-1).delay);
  }
  assert.deepEqual(failures(log).map((e) => [e.errno, e.cause]), cases);
  bridge.close();
});

test("an AggregateError (both addresses of localhost refused) is refused", async () => {
  const { bridge, ws, log } = await connect();
  const err = new AggregateError([systemError("ECONNREFUSED"), systemError("ECONNREFUSED")]);
  ws().refuse(err);
  await advance(0);
  assert.deepEqual(failures(log).map((e) => e.cause), ["refused"]);
  bridge.close();
});

test("ws's refused upgrade (Unexpected server response: 503) without fetch: http 503", async () => {
  const { bridge, ws, log } = await connect();
  ws().refuse(new Error("Unexpected server response: 503"));
  await advance(0);
  assert.deepEqual(failures(log).map((e) => [e.cause, e.status]), [["http", 503]]);
  assert.match(failures(log)[0].message, /HTTP 503 instead of an upgrade/);
  bridge.close();
});

test("a browser (no detail): the probe tells http with its status from unreachable", async () => {
  const fetch = fakeFetch(426, { status: 503, headers: { "Retry-After": "2" } },
    new TypeError("Failed to fetch"), new TypeError("Failed to fetch"), // then no-cors: none
    new TypeError("Failed to fetch"), 0, // then no-cors: an opaque answer (another origin)
    Object.assign(new TypeError("fetch failed"), { cause: systemError("ECONNREFUSED") }));
  const { bridge, ws, log } = await connect({ fetch });
  for (let i = 0; i < 5; i++) {
    ws().refuse();
    await advance(0);
    await advance(log.state.at(-1).delay);
  }
  assert.deepEqual(failures(log).map((e) => [e.cause, e.status ?? null, e.fatal]), [
    ["http", 426, false], ["http", 503, false], ["unreachable", null, false],
    ["http", null, false], ["refused", null, false]]);
  assert.deepEqual(fetch.calls.map((c) => c.init.mode ?? "cors"),
    ["cors", "cors", "cors", "no-cors", "cors", "no-cors", "cors"]);
  assert.match(failures(log)[3].message, /its answer is hidden from this origin/);
  assert.equal(bridge.state, "reconnecting");
  bridge.close();
});

test("a probe that gets no answer within 10 s: timeout", async () => {
  const fetch = (url, init) => new Promise((_resolve, reject) => {
    init.signal.addEventListener("abort", () => reject(new DOMException("aborted", "AbortError")));
  });
  const { bridge, ws, log } = await connect({ fetch });
  ws().refuse();
  await advance(9999);
  assert.equal(failures(log).length, 0);
  await advance(1);
  assert.deepEqual(failures(log).map((e) => e.cause), ["timeout"]);
  bridge.close();
});

test("refusals that are not connection failures report no connect_failed", async () => {
  const { bridge, ws, log } = await connect({ fetch: fakeFetch(403) });
  ws().refuse();
  await advance(0);
  assert.deepEqual(log.error.map((e) => [e.code, e.fatal]), [["forbidden_origin", true]]);
  assert.equal(bridge.state, "closed");
});

test("a drop after open is not a connect failure; the retries that fail are", async () => {
  const { bridge, ws, log } = await connect();
  const a = follow(bridge, "roomA");
  ws().welcome().confirmAll(3);
  ws().event("roomA", 4);
  ws().drop(1006);
  assert.equal(failures(log).length, 0);
  await advance(log.state.at(-1).delay);
  ws().refuse(systemError("ECONNREFUSED"));
  await advance(0);
  assert.deepEqual(failures(log).map((e) => [e.cause, e.attempt]), [["refused", 1]]);
  await advance(log.state.at(-1).delay);
  ws().welcome();
  assert.equal(ws().frames("subscribe")[0].since, 4);
  assert.equal(bridge.state, "open");
  assert.deepEqual(a.errors.length, 0); // a connection's trouble is not the subscription's
  bridge.close();
});

test("a WebSocket constructor that throws: connect_failed, fatal, cause websocket", async () => {
  class Throwing { constructor() { throw new SyntaxError("bad URL"); } }
  const { bridge, log } = await connect({ WebSocket: Throwing });
  assert.deepEqual(log.error.map((e) => [e.code, e.cause, e.fatal]),
    [["connect_failed", "websocket", true]]);
  assert.equal(bridge.state, "closed");
});
