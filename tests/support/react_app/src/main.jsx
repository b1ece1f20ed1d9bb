// Parameters in the fragment: ws (the bridge's WebSocket URL), token, room, parts (the
// components shown, default "room,members,typists").
// window.app: the bridge, React's version, the effects StrictMode ran, each bridge.subscribe()
// the hooks made, what was logged as a warning or an error, and controls.
import { StrictMode, useEffect, useState, version } from "react";
import { createRoot } from "react-dom/client";
import { PgBridge } from "@pgbridge/client";
import { usePresence, useRoom, useTypists } from "@pgbridge/client/react";

const params = new URLSearchParams(location.hash.slice(1));
const parts = (params.get("parts") ?? "room,members,typists").split(",");
const bridge = new PgBridge(params.get("ws"), { token: params.get("token"),
  backoff: { base: 100, cap: 500 } });
const app = (window.app = { bridge, react: version, expected: __REACT_EXPECTED__, mounts: 0,
  events: [], errors: [], subscribes: [], warnings: [] });
for (const level of ["error", "warn"]) { // React's warnings in development (uncached snapshot, ...)
  const log = console[level].bind(console);
  console[level] = (...args) => { app.warnings.push(args.map(String).join(" ")); log(...args); };
}
bridge.addEventListener("error", (e) => app.errors.push(e.detail));
const subscribe = bridge.subscribe.bind(bridge); // what the hooks ask of the client
bridge.subscribe = (name, options) => {
  app.subscribes.push({ room: name, snapshot: options.snapshot ?? null,
    since: options.since ?? null, presence: options.presence ?? null });
  return subscribe(name, options);
};

function Messages({ room }) {
  const { messages, status, error } = useRoom(bridge, room, { snapshot: 3,
    onEvent: (event) => app.events.push([event.seq, event.table, event.op]) });
  return (
    <section id="room" data-status={status} data-error={error ? String(error.code ?? error) : ""}>
      <ul>{messages.map((m) => <li key={m.id} data-id={m.id}>{m.content}</li>)}</ul>
    </section>
  );
}

function Members({ room }) {
  const { members, status } = usePresence(bridge, room);
  return (
    <ul id="members" data-status={status}>
      {[...members.values()].map((p) => (
        <li key={p.user} data-user={p.user} data-online={String(p.online)}>{p.status}</li>))}
    </ul>
  );
}

function Typists({ room }) {
  const { typists, typing } = useTypists(bridge, room);
  app.typing = typing;
  return (
    <div>
      <p id="typists">{typists.join(",")}</p>
      <input id="composer" onInput={typing} />
    </div>
  );
}

function App() {
  const [shown, setShown] = useState(parts);
  const [room, setRoom] = useState(params.get("room"));
  Object.assign(app, { show: setShown, setRoom });
  useEffect(() => { app.mounts += 1; }, []);
  return (
    <main>
      {shown.includes("room") && <Messages room={room} />}
      {shown.includes("members") && <Members room={room} />}
      {shown.includes("typists") && <Typists room={room} />}
    </main>
  );
}

createRoot(document.getElementById("root")).render(<StrictMode><App /></StrictMode>);
