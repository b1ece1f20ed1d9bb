// Driven by tests/integration/test_receipt.py: the real pgbridge.js against a real daemon.
// argv: url token room id. Follows the room, asks sub.pending(id) and sub.pending of an id never
// written (timeout 1 s), prints "subscribed" once the room is followed, then one JSON line per
// outcome: {"id", "seq", "op"} for a confirmed id, {"id", "error"} for a rejected one.
import { PgBridge } from "../../clients/js/pgbridge.js";

const [url, token, room, id] = process.argv.slice(2);
const bridge = new PgBridge(url, { token, fetch: null });
let left = 2;
const report = (line) => {
  console.log(JSON.stringify(line));
  if (--left === 0) bridge.close();
};
let asked = false;
const sub = bridge.subscribe(room, {
  onSubscribed: () => {
    if (asked) return;
    asked = true;
    for (const [wanted, timeout] of [[id, 20000], [`${id}-never`, 1000]]) {
      sub.pending(wanted, { timeout }).then(
        (event) => report({ id: event.id, seq: event.seq, op: event.op }),
        (err) => report({ id: wanted, error: err.code }));
    }
    console.log("subscribed");
  },
  onError: (err) => console.log(JSON.stringify({ error: err.code, message: err.message })),
});
