// A Node program that uses the npm package as an application would: `import {PgBridge} from
// "@pgbridge/client"` with the `ws` package. Copied into the temporary project that
// tests/integration/test_js_package.py installs the packed tarball into (it resolves the
// package from there). Arguments: URL TOKEN ROOM COUNT. Prints one JSON line per `state`,
// `error`, `subscribed` and event; closes after COUNT events.
import { PgBridge } from "@pgbridge/client";
import WebSocket from "ws";

const [url, token, room, count] = process.argv.slice(2);
const out = (line) => process.stdout.write(JSON.stringify(line) + "\n");
const bridge = new PgBridge(url, { token, WebSocket, backoff: { base: 50, cap: 250 } });
bridge.addEventListener("state", (e) => out({ kind: "state", state: e.detail.state }));
bridge.addEventListener("error", (e) => out({ kind: "error", ...e.detail }));
let received = 0;
bridge.subscribe(room, {
  onSubscribed: (f) => out({ kind: "subscribed", from: f.from }),
  onEvent(event) {
    out({ kind: "event", seq: event.seq, table: event.table, op: event.op,
      content: event.table === "messages" ? event.data.content : null });
    if (++received === Number(count)) {
      bridge.close();
      setTimeout(() => process.exit(0), 2000).unref();
    }
  },
});
