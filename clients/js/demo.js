// The demo page (served at / while PGBRIDGE_DEMO is on): a live timeline of one or more rooms,
// with who is online and who is typing, and the list of the user's rooms (the feed) with the
// count of messages of others not read yet, built on client.js. Opening a room reads it (an
// ack). Everything a message or a member's status holds is untrusted text: it is only ever put
// into the page with textContent, never as HTML.
import { PgBridge } from "/client.js";

const $ = (id) => document.getElementById(id);
const SHOWN_MEMBERS = 50; // online members listed per room; the rest are counted
const MAX_UNREAD = 100; // the bridge counts up to this many: 100 means "100 or more"
const params = new URLSearchParams(location.hash.slice(1));
const token = params.get("token");
const rooms = params.getAll("room").flatMap((r) => r.split(",")).map((r) => r.trim())
  .filter(Boolean);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function logLine(text) {
  const item = el("li", "", `${new Date().toISOString().slice(11, 23)} ${text}`);
  $("log").append(item);
  item.scrollIntoView({ block: "nearest" });
}

function problem(text) {
  $("problem").textContent = text;
  $("problem").hidden = false;
}

// One room's part of the page: who is online and typing, the timeline keyed by message id, and
// the reactions by id.
class RoomView {
  constructor(room) {
    this.room = room;
    this.messages = new Map(); // messages.id -> <li>
    this.reactions = new Map(); // reactions.id -> {message, emoji}
    this.membersDue = false; // a redraw of the members is scheduled
    this.section = el("section", "room");
    this.section.dataset.room = room;
    this.title = el("h2", "", `room ${room}`);
    this.meta = el("p", "meta", "subscribing…");
    this.online = el("ul", "members");
    this.online.setAttribute("aria-label", "online members");
    this.typing = el("p", "typing");
    this.typing.setAttribute("aria-live", "polite");
    this.timeline = el("ol", "timeline");
    this.section.append(this.title, this.meta, this.online, this.typing, this.timeline);
    $("rooms").append(this.section);
  }

  // A snapshot is one presence frame per member: redraw once per animation frame, not per frame.
  members(members) {
    if (this.membersDue) return;
    this.membersDue = true;
    requestAnimationFrame(() => {
      this.membersDue = false;
      const online = [...members.values()].filter((p) => p.online);
      const items = online.slice(0, SHOWN_MEMBERS).map((p) => {
        const away = p.status !== "online" ? ` (${p.status})` : "";
        const item = el("li", p.status === "online" ? "" : "away",
                        `${p.user}${away}${p.customStatus ? ` — ${p.customStatus}` : ""}`);
        item.dataset.user = p.user;
        return item;
      });
      if (online.length > SHOWN_MEMBERS) {
        items.push(el("li", "more", `and ${online.length - SHOWN_MEMBERS} more`));
      }
      this.online.replaceChildren(...items);
      this.online.dataset.count = String(online.length);
    });
  }

  typists(users) {
    const names = users.length > 3 ? [...users.slice(0, 2), `${users.length - 2} more`] : users;
    const list = names.length > 1 ? `${names.slice(0, -1).join(", ")} and ${names.at(-1)}`
      : names.join("");
    this.typing.textContent = !users.length ? ""
      : `${list} ${users.length > 1 ? "are" : "is"} typing…`;
  }

  cursor(seq, extra = "") {
    this.section.dataset.cursor = String(seq ?? "");
    this.meta.textContent = `cursor (last seq received): ${seq ?? "none"}${extra}`;
  }

  message(row) {
    let item = this.messages.get(row.id);
    if (!item) {
      item = el("li");
      item.dataset.id = row.id;
      item.append(el("span", "author", row.user_id), el("span", "content"),
                  el("span", "edited"), el("span", "reactions"));
      this.messages.set(row.id, item);
      this.timeline.append(item);
    }
    return item;
  }

  apply(event) {
    const row = event.data || {};
    if (event.table === "messages") {
      const item = this.message(event.op === "DELETE" ? { ...row, id: event.id } : row);
      item.dataset.seq = String(event.seq);
      const gone = event.op === "DELETE" || row.deleted_at;
      item.classList.toggle("deleted", Boolean(gone));
      item.querySelector(".content").textContent = gone ? "message deleted" : String(row.content);
      if (event.op === "UPDATE" && !gone) item.querySelector(".edited").textContent = "(edited)";
    } else if (event.table === "reactions") {
      if (event.op === "DELETE") this.reactions.delete(event.id);
      else this.reactions.set(event.id, { message: row.message_id, emoji: String(row.emoji) });
      this.renderReactions(row.message_id);
    } else if (event.table === "channels" && (event.op === "DELETE" || row.deleted_at)) {
      this.timeline.append(el("li", "system", "this room was deleted"));
    }
  }

  renderReactions(messageId) {
    const item = this.messages.get(messageId);
    if (!item) return;
    const counts = new Map();
    for (const r of this.reactions.values()) {
      if (r.message === messageId) counts.set(r.emoji, (counts.get(r.emoji) || 0) + 1);
    }
    item.querySelector(".reactions").textContent =
      [...counts].map(([emoji, n]) => (n > 1 ? `${emoji}×${n}` : emoji)).join(" ");
  }
}

// The list of the user's rooms from the feed, each with a badge of its unread messages, kept
// current by client.js as messages arrive and acks are made. A room open on the page is read:
// the feed is told so (an ack up to the room's head), whatever arrives in it.
class Inbox {
  constructor(bridge, open, isOpen) {
    this.items = new Map(); // room -> <li>
    this.isOpen = isOpen;
    this.open = open;
    this.feed = bridge.feed({
      onFeed: (all) => {
        this.items.clear();
        $("feed").replaceChildren();
        for (const [room, entry] of all) this.show(room, entry);
        $("inbox-state").textContent = `${all.size} room${all.size === 1 ? "" : "s"}`;
      },
      onUpdate: (room, entry) => this.show(room, entry),
      onJoin: (room) => logLine(`joined room ${room}`),
      onLeave: (room, reason) => {
        this.items.get(room)?.remove();
        this.items.delete(room);
        logLine(`left room ${room}: ${reason}`);
      },
      onError: (err) => {
        if (err.fatal) $("inbox-state").textContent = `no feed: ${err.code}: ${err.message}`;
      },
    });
  }

  show(room, entry) {
    let item = this.items.get(room);
    if (!item) {
      item = el("li");
      item.dataset.room = room;
      const button = el("button", "", room);
      button.type = "button";
      button.addEventListener("click", () => this.open(room));
      item.append(button, el("span", "badge"));
      this.items.set(room, item);
      $("feed").append(item);
    }
    item.classList.toggle("open", this.isOpen(room));
    if (this.isOpen(room) && entry.acked < entry.head) return this.feed.ack(room, entry.head);
    const badge = item.querySelector(".badge");
    badge.textContent = !entry.unread ? ""
      : entry.unread >= MAX_UNREAD ? `${MAX_UNREAD - 1}+` : String(entry.unread);
    badge.title = `${entry.unread} unread`;
    item.dataset.unread = String(entry.unread);
  }

  read(room) { // the room was opened
    const entry = this.feed.rooms.get(room);
    if (entry) this.show(room, entry);
  }
}

if (!token) {
  problem("Give a token in the address: /#token=…, and the rooms to open: &room=…");
} else {
  const bridge = new PgBridge("/ws", { token });
  let reconnects = 0;
  bridge.addEventListener("state", ({ detail }) => {
    $("state").textContent = detail.state;
    const why = detail.code ? ` (close ${detail.code}${detail.reason ? `: ${detail.reason}` : ""})` : "";
    const wait = detail.delay ? `, next attempt in ${Math.round(detail.delay)} ms` : "";
    logLine(`${detail.state}${why}${wait}`);
  });
  bridge.addEventListener("reconnect", () => {
    reconnects += 1;
    $("reconnects").textContent = String(reconnects);
  });
  bridge.addEventListener("error", ({ detail }) => {
    logLine(`error ${detail.code}${detail.room ? ` in room ${detail.room}` : ""}: ${detail.message}`);
    if (detail.fatal && !detail.room && !detail.feed) {
      problem(`stopped: ${detail.code}: ${detail.message}`);
    }
  });
  const opened = new Map(); // room -> its Subscription, once open
  let inbox = null;
  const open = (room) => {
    if (opened.has(room)) return opened.get(room).section?.scrollIntoView();
    let sub;
    const view = new RoomView(room);
    try { // the address is the user's to type: subscribe() refuses what is not a room id
      sub = bridge.subscribe(room, {
        since: 0, // the demo shows the room's whole retained history
        presence: true, // and who is online and typing
        onSubscribed: (frame) => {
          view.cursor(sub.lastSeq, `, room head at subscribe: ${frame.head}`);
          view.members(sub.members); // emptied: the snapshot follows
        },
        onPresence: () => view.members(sub.members),
        onTypists: (users) => view.typists(users),
        onEvent: (event) => {
          view.apply(event);
          view.cursor(event.seq);
        },
        onError: (err) => {
          view.cursor(sub.lastSeq, ` — ${err.code}: ${err.message}`);
          if (err.fatal) view.typists([]); // ended: no more typing signals, nor their expiry
        },
      });
      opened.set(room, { sub, section: view.section });
    } catch (err) {
      view.cursor(null, ` — not followed: ${err.message}`);
    }
    inbox?.read(room);
  };
  for (const room of rooms) open(room);
  inbox = new Inbox(bridge, open, (room) => opened.get(room)?.sub.active === true);
  window.pgbridgeDemo = { bridge, feed: inbox.feed }; // for a look from the browser's console
}
