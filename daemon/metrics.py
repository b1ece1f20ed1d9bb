"""Prometheus metrics of one bridge (served at ``GET /metrics``). Each bridge has its own
registry, so several bridges can live in one process (tests).

What each metric means and what to alert on: docs/reference/metrics.md;
``deploy/prometheus-alerts.yml`` and ``deploy/grafana-dashboard.json`` use them.

Nothing here is computed on the fan-out path beyond a counter increment or one histogram
observation per event: the listener's lag and the pool's state are read when ``/metrics`` is
scraped (:meth:`Metrics.watch_pool`, and the listener's function gauges). The scrape is
rendered synchronously on the event loop (daemon/handshake.py), so nothing read at scrape time
may wait for the database: the indexes' scan counts (``pgbridge_index_scans_total``) are read
by a periodic task (``daemon.app``) into a cache, and the scrape reads the cache
(:meth:`Metrics.index_scans_read`).

The spec's metrics (spec 003, "Monitoring Requirements": ``queryDuration``, ``indexUsage``,
``triggerExecution``) are ``pgbridge_query_duration_seconds``, ``pgbridge_index_scans_total``
and ``pgbridge_trigger_executions_total``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .closes import Close

__all__ = ["CAPTURED_TABLES", "CLOSE_CODES", "LATENCY_BUCKETS", "MAX_INDEX_SERIES",
           "QUERY_PURPOSES", "READ_BUCKETS", "SPEC_TABLES", "Metrics", "QueryPurpose"]

# The close codes the server sends (daemon/closes.py); each is exported from the start (at 0), so
# that rate() and increase() see the first one.
CLOSE_CODES = tuple(str(int(code)) for code in Close)
# Seconds. Live deliveries take about a millisecond on a quiet machine; replayed events can be
# days old (the log's retention), so the top buckets only say "long ago".
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 300.0, 3600.0)
# Seconds for one read of the log: at most READ_PAGE (500) events of one room, or about READ_ROWS
# (2,000) over many (daemon/sequencer.py).
READ_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0)
# Why the daemon runs a statement on its pool (``pgbridge_query_duration_seconds{purpose}``): a
# fixed set, never a room or user id, so the label's cardinality is bounded (mypy checks that
# every call of daemon.store_pool.Pooled._all names one of these).
QueryPurpose = Literal[
    "startup_check",    # standby? privileges? (once per start)
    "schema_check",     # pgbridge still installed? (after a statement found an object missing)
    "notify_key",       # the NOTIFY signing key (at start, and when the listener reconnects)
    "notify",           # the listener's probe, a typing signal relayed to the other instances
    "user_check",       # a token's user still live (every handshake; batched)
    "access",           # deleted users, lost memberships (hints and the periodic check)
    "room_head",        # a room's last seq, when a subscribe starts tracking it
    "cursor_info",      # what a subscribe needs (batched)
    "read_events",      # one room's events: a gap fill, a replay
    "snapshot",         # a subscribe's snapshot of the room's recent messages
    "feed",             # a feed's rooms, heads, acks and unread counts (once per feed)
    "feed_members",     # the memberships of feeds' users (a join's hint, a reconnect; batched)
    "read_rooms",       # many rooms' events: a catch-up, a poll
    "doorbell",         # pgbridge_doorbell(): the doorbell lease
    "ack_flush",        # sync_state upserts
    "prune",            # change_events past the retention
    "presence_write",   # presence leases and transitions (sync, reap, retire)
    "presence_read",    # members' presence for a presence frame
    "health",           # /healthz's SELECT 1
    "index_stats",      # pg_stat_user_indexes, for pgbridge_index_scans_total
]
QUERY_PURPOSES: tuple[str, ...] = get_args(QueryPurpose)
# The spec's ten tables (spec 003, "Schema Documentation"): pgbridge_trigger_executions_total's
# table label is one of these or "other", its op label INSERT, UPDATE, DELETE or "other".
SPEC_TABLES = frozenset({
    "users", "channels", "messages", "channel_members", "reactions", "files", "user_settings",
    "user_status", "message_reads", "sync_state"})
_OPS = frozenset({"INSERT", "UPDATE", "DELETE"})
# The tables the capture trigger publishes (sql/triggers/10_change_capture.sql): their series
# are exported from the start (at 0), so that rate() and increase() see the first change.
CAPTURED_TABLES = ("channels", "messages", "channel_members", "reactions", "files",
                   "message_reads")
# pgbridge_index_scans_total exports at most this many indexes (the schema holds about 30).
MAX_INDEX_SERIES = 200


class _PoolCollector(Collector):
    """``psycopg_pool``'s own statistics (``AsyncConnectionPool.get_stats()``), read at scrape
    time: the pool keeps them anyway, so a request for a connection costs nothing more."""

    def __init__(self, stats: Callable[[], Mapping[str, int]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        for name, key, text in (
                ("pgbridge_pool_connections", "pool_size", "Connections the pool holds (in use "
                 "or idle)"),
                ("pgbridge_pool_max_connections", "pool_max", "Connections the pool may open "
                 "(PGBRIDGE_POOL_SIZE)"),
                ("pgbridge_pool_idle_connections", "pool_available", "Idle connections in the "
                 "pool"),
                ("pgbridge_pool_waiting_requests", "requests_waiting", "Requests waiting for a "
                 "connection now")):
            yield GaugeMetricFamily(name, text, value=s.get(key, 0))
        for name, key, text, scale in (
                ("pgbridge_pool_requests", "requests_num", "Requests for a pooled connection",
                 1.0),
                ("pgbridge_pool_queued_requests", "requests_queued", "Requests that found no "
                 "idle connection and had to wait", 1.0),
                ("pgbridge_pool_wait_seconds", "requests_wait_ms", "Seconds requests spent "
                 "waiting for a connection, summed", 0.001),
                ("pgbridge_pool_request_errors", "requests_errors", "Requests that got no "
                 "connection: waited POOL_WAIT (5 s) in vain, or were cancelled while waiting",
                 1.0)):
            yield CounterMetricFamily(name, text, value=s.get(key, 0) * scale)


class _IndexScansCollector(Collector):
    """``pgbridge_index_scans_total{table, index}`` from the last rows handed to
    :meth:`Metrics.index_scans_read`: read from a cache, never from the database."""

    def __init__(self) -> None:
        self.rows: tuple[tuple[str, str, int], ...] = ()

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "pgbridge_index_scans", "Index scans started on each index of the bridge's schema "
            "(pg_stat_user_indexes.idx_scan, every session's scans; read by the bridge every "
            "5 s, INDEX_STATS_INTERVAL in daemon/app.py; reset with the server's statistics)",
            labels=["table", "index"])
        for table, index, scans in self.rows:
            family.add_metric([table, index], scans)
        yield family


class Metrics:
    """The bridge's metrics. Attributes are the prometheus_client objects; a module updates
    the ones it owns (the server the connection and close counts, the listener the event,
    latency and lag metrics, ...)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge("pgbridge_connections", "Open WebSocket connections", registry=r)
        self.subscriptions = Gauge("pgbridge_subscriptions", "Live subscriptions", registry=r)
        self.events = Counter("pgbridge_events", "Events published to the hub", registry=r)
        self.deliveries = Counter("pgbridge_deliveries", "Live event frames queued to clients "
                                  "(replayed ones: pgbridge_replayed_deliveries)", registry=r)
        self.replayed = Counter("pgbridge_replayed_deliveries", "Event frames read from the log "
                                "and queued to a client that subscribed with an older cursor "
                                "(since, or its sync_state)", registry=r)
        self.gap_fills = Counter("pgbridge_gap_fills", "Reads of the log started to fill a gap "
                                 "(per room), catch up or poll (per query)", registry=r)
        self.commit_to_send = Histogram(
            "pgbridge_commit_to_send_seconds", "Seconds from an event's capture in the writer's "
            "transaction (its ts, the database's clock) to the moment its frame was written or "
            "queued to every live subscriber (kind=live: once per published event, whatever "
            "the number of subscribers) or replayed to one client (kind=replay: once per "
            "replayed frame; mostly how long that client was away)", ["kind"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.latency_live = self.commit_to_send.labels("live")
        self.latency_replay = self.commit_to_send.labels("replay")
        self.log_reads = Histogram(
            "pgbridge_log_read_seconds", "Seconds per read of change_events (at most 500 "
            "events of one room, or about 2,000 over up to 500 rooms), by purpose: gap_fill (a "
            "NOTIFY whose seq is not the room's next, or too large to carry its event), "
            "catch_up (after the listener (re)connected, or a failed read), poll (while writers "
            "do not NOTIFY: one read of every room with subscribers every "
            "PGBRIDGE_POLL_INTERVAL), replay (a subscriber's history); failed reads included",
            ["purpose"], buckets=READ_BUCKETS, registry=r)
        self.read_gap_fill = self.log_reads.labels("gap_fill")
        self.read_catch_up = self.log_reads.labels("catch_up")
        self.read_replay = self.log_reads.labels("replay")
        self.read_poll = self.log_reads.labels("poll")
        self.doorbell_polling = Gauge("pgbridge_doorbell_polling", "1 while writers do not "
                                      "NOTIFY (the doorbell lease runs, or just ended) and this "
                                      "bridge reads the log on an interval, else 0", registry=r)
        self.capture_rate = Gauge("pgbridge_capture_rate", "Events per second captured, as "
                                  "this bridge estimates it to choose between doorbell and "
                                  "polls (PGBRIDGE_DOORBELL_QUIET_ABOVE)", registry=r)
        self.listener_lag = Gauge("pgbridge_listener_lag_seconds", "Seconds since the listener "
                                  "last heard anything on its LISTEN connection (a NOTIFY, or "
                                  "its own probe, sent every PGBRIDGE_PROBE_INTERVAL)",
                                  registry=r)
        self.probe_age = Gauge("pgbridge_listener_probe_age_seconds", "Seconds since the "
                               "listener's last NOTIFY round trip came back (what the systemd "
                               "watchdog is petted on)", registry=r)
        self.listener_up = Gauge("pgbridge_listener_connected", "1 while the LISTEN connection "
                                 "is up, else 0", registry=r)
        self.rooms_behind = Gauge("pgbridge_listener_rooms_behind", "Tracked rooms that the "
                                  "current catch-up has not yet read to the end of the log (0 "
                                  "once it finished; stays above 0 while it fails and is "
                                  "retried)", registry=r)
        self.listener_reconnects = Counter("pgbridge_listener_reconnects", "Listener "
                                           "(re)connections after a failure", registry=r)
        # the broker mode (PGBRIDGE_BROKER, daemon/broker.py); exported with a broker only
        self.broker_state = Gauge("pgbridge_broker_state", "1 for this instance's state in the "
                                  "broker mode: leader (the capture reader), follower (fed by "
                                  "the broker), fallback (reading the log itself)", ["state"],
                                  registry=None)
        self.broker_up = Gauge("pgbridge_broker_up", "1 while connected to the broker",
                               registry=None)
        self.broker_lag = Gauge("pgbridge_broker_lag_seconds", "Seconds since the capture "
                                "reader's last heartbeat (0 on the capture reader itself)",
                                registry=None)
        self.broker_fallbacks = Counter("pgbridge_broker_fallbacks", "Times this instance "
                                        "started reading the log itself (no heartbeat, broker "
                                        "lost, stepped down)", registry=None)
        self.broker_relayed = Counter("pgbridge_broker_relayed", "Events this instance "
                                      "published to the broker as the capture reader",
                                      registry=None)
        self.broker_forged = Counter("pgbridge_broker_forged", "Broker messages dropped: "
                                     "signature failed (or another key's)", registry=None)
        self.slow_closes = Counter("pgbridge_slow_client_closes", "Connections closed with 4008",
                                   registry=r)
        self.closes = Counter("pgbridge_closes", "WebSocket connections the bridge closed, by "
                              "the close code it sent first: " + ", ".join(
                                  f"{int(code)} {code.meaning}" for code in Close),
                              ["code"], registry=r)
        for code in CLOSE_CODES:
            self.closes.labels(code)
        self.handshake_refusals = Counter("pgbridge_handshake_refusals", "Upgrades refused, by "
                                          "reason (unauthorized 401, forbidden_origin 403, "
                                          "too_many_connections 429, overloaded and "
                                          "unavailable 503, early_data 400: more than 64 KiB "
                                          "sent before the answer), or given up because the "
                                          "client left first (client_gone)", ["reason"],
                                          registry=r)
        self.refusals = Counter("pgbridge_refusals", "Client frames refused, by error code "
                                "(rate_limited, bad_request, ...), and connections closed "
                                "for abuse or over a limit", ["reason"], registry=r)
        self.revocations = Counter("pgbridge_access_revocations", "Access ended by the access "
                                   "checks: connections of deleted users closed (user_deleted), "
                                   "subscriptions ended by the periodic check "
                                   "(periodic_check)", ["reason"], registry=r)
        self.forged_notifies = Counter("pgbridge_forged_notifies", "NOTIFY payloads on the "
                                       "bridge's channels that failed their signature check "
                                       "(ignored; sent by a role that can name the secret "
                                       "channels but signs without the key)", registry=r)
        self.shed_notifies = Counter("pgbridge_shed_notifies", "NOTIFY payloads on the "
                                     "bridge's channels dropped without a signature check, "
                                     "because REJECT_LIMIT (50) failed it within REJECT_WINDOW "
                                     "(0.25 s); the log is read instead", registry=r)
        self.presence_users = Gauge("pgbridge_presence_users", "Users this instance holds "
                                    "online (connected, or in their grace period)", registry=r)
        self.presence_transitions = Counter("pgbridge_presence_transitions", "user_status "
                                            "transitions (online, offline) written by this "
                                            "instance", registry=r)
        self.presence_reaped = Counter("pgbridge_presence_reaped_instances", "Other instances "
                                       "whose presence lease ran out, expired by this one",
                                       registry=r)
        self.presence_frames = Counter("pgbridge_presence_frames", "presence frames queued to "
                                       "clients (snapshots and changes)", registry=r)
        self.typing = Counter("pgbridge_typing_signals", "Typing signals: relayed (accepted from "
                              "a client and sent to the other instances), dropped (over the "
                              "rate, or the database could not take it), delivered (frames "
                              "queued to clients), stale (older than the replay window, or "
                              "heard already)",
                              ["outcome"], registry=r)
        self.acks_saved = Counter("pgbridge_acks_saved", "sync_state rows upserted", registry=r)
        self.pruned = Counter("pgbridge_pruned_events", "change_events rows pruned", registry=r)
        self.query_duration = Histogram(
            "pgbridge_query_duration_seconds", "Seconds per statement the daemon runs on its "
            "pool, by purpose, as its caller waits for it: from the request for a pooled "
            "connection (the wait for one included: pgbridge_pool_wait_seconds_total tells it "
            "apart) to the last row fetched, a retry on a lost connection included; failed "
            "statements included. The LISTEN connection's own statements are not counted",
            ["purpose"], buckets=READ_BUCKETS, registry=r)
        self.trigger_executions = Counter(
            "pgbridge_trigger_executions", "Captured changes (one capture trigger execution "
            "that published an event) this bridge published to its subscribers, by table and "
            "op, counted once per event whatever the number of subscribers; changes of rooms "
            "with no subscriber here are not seen", ["table", "op"], registry=r)
        self._captured: dict[tuple[str, str], Counter] = {}
        for table in CAPTURED_TABLES:
            for op in _OPS:
                self._captured[table, op] = self.trigger_executions.labels(table, op)
        self._index_scans = _IndexScansCollector()
        r.register(self._index_scans)

    def captured(self, table: str, op: str) -> None:
        """Count one published event of ``table`` (``op``: ``INSERT``, ``UPDATE``,
        ``DELETE``) in ``pgbridge_trigger_executions_total``; a table not among the spec's ten,
        or another op, is counted as ``other`` (at most 44 series: 11 tables, 4 ops)."""
        key = (table if table in SPEC_TABLES else "other", op if op in _OPS else "other")
        child = self._captured.get(key)
        if child is None:
            child = self._captured[key] = self.trigger_executions.labels(*key)
        child.inc()

    def index_scans_read(self, rows: Iterable[tuple[str, str, int]]) -> None:
        """Replace what ``pgbridge_index_scans_total`` exports with ``rows``: ``(table, index,
        idx_scan)`` as read from ``pg_stat_user_indexes`` (the first
        :data:`MAX_INDEX_SERIES`)."""
        self._index_scans.rows = tuple(rows)[:MAX_INDEX_SERIES]

    def export_broker(self, *, states: tuple[str, ...], state: Callable[[], str],
                      up: Callable[[], bool], lag: Callable[[], float]) -> None:
        """Export the ``pgbridge_broker_*`` metrics (a bridge with a broker), the gauges read at
        every scrape from ``state`` (one of ``states``), ``up`` and ``lag``. Call once."""
        for name in states:
            self.broker_state.labels(name).set_function(
                lambda name=name: 1.0 if state() == name else 0.0)  # type: ignore[misc]
        self.broker_up.set_function(lambda: 1.0 if up() else 0.0)
        self.broker_lag.set_function(lag)
        for metric in (self.broker_state, self.broker_up, self.broker_lag,
                       self.broker_fallbacks, self.broker_relayed, self.broker_forged):
            self.registry.register(metric)

    def watch_pool(self, stats: Callable[[], Mapping[str, int]]) -> None:
        """Export the connection pool's statistics (``pgbridge_pool_*``), read from ``stats``
        (``psycopg_pool``'s ``get_stats()``) at every scrape. Call once."""
        self.registry.register(_PoolCollector(stats))

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)
