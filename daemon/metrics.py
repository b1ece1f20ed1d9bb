"""Prometheus metrics of one bridge (served at ``GET /metrics``). Each bridge has its own
registry, so several bridges can live in one process (tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge("pgbridge_connections", "Open WebSocket connections", registry=r)
        self.subscriptions = Gauge("pgbridge_subscriptions", "Live subscriptions", registry=r)
        self.events = Counter("pgbridge_events", "Events published to the hub", registry=r)
        self.deliveries = Counter("pgbridge_deliveries", "Event frames queued to clients",
                                  registry=r)
        self.gap_fills = Counter("pgbridge_gap_fills", "Reads of the log to fill a gap or catch "
                                 "up", registry=r)
        self.listener_reconnects = Counter("pgbridge_listener_reconnects", "Listener "
                                           "(re)connections after a failure", registry=r)
        self.slow_closes = Counter("pgbridge_slow_client_closes", "Connections closed with 4008",
                                   registry=r)
        self.handshake_refusals = Counter("pgbridge_handshake_refusals", "Upgrades refused, by "
                                          "reason (unauthorized 401, forbidden_origin 403, "
                                          "too_many_connections 429, overloaded and "
                                          "unavailable 503), or given up because the client "
                                          "left first (client_gone)", ["reason"], registry=r)
        self.refusals = Counter("pgbridge_refusals", "Client frames refused, by error code "
                                "(rate_limited, bad_request, ...), and connections closed "
                                "for abuse or over a limit", ["reason"], registry=r)
        self.revocations = Counter("pgbridge_access_revocations", "Access ended by the access "
                                   "checks: connections of deleted users closed (user_deleted), "
                                   "subscriptions ended by the periodic check "
                                   "(periodic_check)", ["reason"], registry=r)
        self.forged_notifies = Counter("pgbridge_forged_notifies", "NOTIFY payloads on the "
                                       "bridge's channel that failed their signature check "
                                       "(ignored; sent by a role without the key)", registry=r)
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
                              "queued to clients), stale (older than the replay window)",
                              ["outcome"], registry=r)
        self.acks_saved = Counter("pgbridge_acks_saved", "sync_state rows upserted", registry=r)
        self.pruned = Counter("pgbridge_pruned_events", "change_events rows pruned", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
