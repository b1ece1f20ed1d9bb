"""The spec's metrics (spec 003, "Monitoring Requirements") as far as they are pure:
``pgbridge_trigger_executions_total`` keeps its labels bounded whatever a frame names, and
``pgbridge_index_scans_total`` exports the cache it was last handed, read at scrape time
without the database. What they measure against a real server: tests/integration/
test_spec_metrics.py."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from daemon.metrics import CAPTURED_TABLES, MAX_INDEX_SERIES, QUERY_PURPOSES, Metrics


def samples(metrics: Metrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(metrics.render().decode())
            for s in family.samples if s.name == name}


def test_trigger_executions_start_at_zero_and_fold_unknown_tables_and_ops_into_other() -> None:
    metrics = Metrics()
    before = samples(metrics, "pgbridge_trigger_executions_total")
    assert len(before) == len(CAPTURED_TABLES) * 3 and set(before.values()) == {0.0}
    metrics.captured("messages", "INSERT")
    metrics.captured("messages", "INSERT")
    metrics.captured("users", "UPDATE")  # one of the spec's ten, not captured today
    for i in range(100):  # whatever a frame names, at most one more series per label
        metrics.captured(f"table_{i}", f"OP{i}")
    after = samples(metrics, "pgbridge_trigger_executions_total")
    assert after[("op", "INSERT"), ("table", "messages")] == 2
    assert after[("op", "UPDATE"), ("table", "users")] == 1
    assert after[("op", "other"), ("table", "other")] == 100
    assert len(after) == len(before) + 2


def test_index_scans_are_exported_from_the_last_rows_read_and_bounded() -> None:
    metrics = Metrics()
    family = [f for f in metrics.registry.collect() if f.name == "pgbridge_index_scans"]
    assert family and family[0].type == "counter" and not family[0].samples  # nothing read yet
    metrics.index_scans_read([("messages", "messages_pkey", 7), ("users", "users_pkey", 0)])
    assert samples(metrics, "pgbridge_index_scans_total") == {
        (("index", "messages_pkey"), ("table", "messages")): 7.0,
        (("index", "users_pkey"), ("table", "users")): 0.0}
    metrics.index_scans_read(("t", f"i{n}", n) for n in range(MAX_INDEX_SERIES + 50))
    assert len(samples(metrics, "pgbridge_index_scans_total")) == MAX_INDEX_SERIES


def test_query_purposes_are_short_fixed_names() -> None:
    assert len(QUERY_PURPOSES) == len(set(QUERY_PURPOSES)) <= 20
    assert all(p.replace("_", "").isalpha() and p.islower() for p in QUERY_PURPOSES)
