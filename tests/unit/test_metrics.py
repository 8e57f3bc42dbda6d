"""GatewayMetrics: rendered values after known call sequences, monotonic totals."""

from __future__ import annotations

from prometheus_text import Samples, only, parse_samples

from muxgate.gateway._metrics import OTHER_MODELS, REQUEST_DURATION_BUCKETS, GatewayMetrics
from muxgate.replicas.contract import MODEL_LOAD_BUCKETS, load_bucket_key


def scrape(metrics: GatewayMetrics) -> Samples:
    """Every sample of a rendered scrape, keyed by (sample name, sorted labels)."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return parse_samples(body.decode())


def test_gateway_side_series_have_exact_values() -> None:
    m = GatewayMetrics()
    m.observe_request("Model", 200, 0.003)
    m.observe_request("Model", 200, 0.2, model_id="m1")
    m.observe_request("Model", 503, 7.0)
    m.observe_request("Other", 500, 0.0005)
    m.set_queue_length("Model", 4)
    m.set_queue_length("Model", 2)
    m.set_replicas("Model", {"starting": 1, "running": 2})
    m.set_replicas("Model", {"running": 3, "draining": 1})
    m.count_spillover("Model", "m1")
    m.count_spillover("Model")

    s = scrape(m)
    assert only(s, "muxgate_requests_total") == {
        (("deployment", "Model"), ("status", "200")): 2.0,
        (("deployment", "Model"), ("status", "503")): 1.0,
        (("deployment", "Other"), ("status", "500")): 1.0,
    }
    assert only(s, "muxgate_request_duration_seconds_count") == {
        (("deployment", "Model"),): 3.0,
        (("deployment", "Other"),): 1.0,
    }
    assert only(s, "muxgate_request_duration_seconds_sum")[(("deployment", "Model"),)] == (
        0.003 + 0.2 + 7.0
    )
    buckets = {
        dict(labels)["le"]: value
        for labels, value in only(s, "muxgate_request_duration_seconds_bucket").items()
        if dict(labels)["deployment"] == "Model"
    }
    assert len(buckets) == len(REQUEST_DURATION_BUCKETS) + 1
    assert buckets["0.001"] == 0.0
    assert buckets["0.005"] == 1.0
    assert buckets["0.25"] == 2.0
    assert buckets["5.0"] == 2.0
    assert buckets["10.0"] == 3.0
    assert buckets["+Inf"] == 3.0
    assert only(s, "muxgate_queue_length") == {(("deployment", "Model"),): 2.0}
    assert only(s, "muxgate_replicas") == {
        (("deployment", "Model"), ("state", "draining")): 1.0,
        (("deployment", "Model"), ("state", "running")): 3.0,
        (("deployment", "Model"), ("state", "starting")): 0.0,  # seen before, now none
    }
    assert only(s, "muxgate_spillovers_total") == {(("deployment", "Model"),): 2.0}


def test_per_model_labels_are_off_by_default() -> None:
    m = GatewayMetrics()
    m.observe_request("Model", 200, 0.01, model_id="m1")
    m.count_spillover("Model", "m1")
    body, _ = m.render()
    assert b"model=" not in body
    assert 'model="m1"' not in body.decode()


def test_model_labels_are_bounded_per_deployment() -> None:
    # The ids come from clients: before, each new one (random ids, or ids
    # that do not exist) was a new series for as long as the gateway ran.
    m = GatewayMetrics(per_model_labels=True, max_model_labels=3)
    for i in range(50):
        m.observe_request("Model", 404, 0.01, model_id=f"random-{i}")
        m.count_spillover("Model", f"random-{i}")
    m.observe_request("Model", 200, 0.01, model_id="random-1")  # labelled already
    m.observe_request("Other", 200, 0.01, model_id="x")  # a budget per deployment
    s = scrape(m)
    requests = only(s, "muxgate_requests_total")
    assert requests == {
        (("deployment", "Model"), ("model", "random-0"), ("status", "404")): 1.0,
        (("deployment", "Model"), ("model", "random-1"), ("status", "404")): 1.0,
        (("deployment", "Model"), ("model", "random-2"), ("status", "404")): 1.0,
        (("deployment", "Model"), ("model", OTHER_MODELS), ("status", "404")): 47.0,
        (("deployment", "Model"), ("model", "random-1"), ("status", "200")): 1.0,
        (("deployment", "Other"), ("model", "x"), ("status", "200")): 1.0,
    }
    assert len(only(s, "muxgate_spillovers_total")) == 4


def test_per_model_labels_when_enabled() -> None:
    m = GatewayMetrics(per_model_labels=True)
    m.observe_request("Model", 200, 0.01, model_id="m1")
    m.observe_request("Model", 200, 0.01, model_id="m2")
    m.observe_request("Model", 200, 0.01)
    m.count_spillover("Model", "m2")
    s = scrape(m)
    assert only(s, "muxgate_requests_total") == {
        (("deployment", "Model"), ("model", "m1"), ("status", "200")): 1.0,
        (("deployment", "Model"), ("model", "m2"), ("status", "200")): 1.0,
        (("deployment", "Model"), ("model", ""), ("status", "200")): 1.0,
    }
    assert (
        only(s, "muxgate_request_duration_seconds_count")[
            (("deployment", "Model"), ("model", "m1"))
        ]
        == 1.0
    )
    assert only(s, "muxgate_spillovers_total") == {(("deployment", "Model"), ("model", "m2")): 1.0}


def counters(**values: float) -> dict[str, float]:
    return dict(values)


def test_replica_counters_are_summed_per_deployment() -> None:
    m = GatewayMetrics()
    m.set_replica_counters(
        "Model",
        "Model#a",
        counters(
            model_loads=3,
            model_load_failures=1,
            model_unloads_lru=1,
            model_unloads_shutdown=0,
            model_unloads_drain=0,
            model_unloads_admin=1,
            cache_hits=10,
            cache_misses=4,
            model_load_seconds_sum=1.5,
            models_loaded=2,
        ),
    )
    m.set_replica_counters(
        "Model",
        "Model#b",
        counters(model_loads=2, model_unloads_drain=2, cache_hits=1, model_load_seconds_sum=0.25),
    )
    m.set_replica_counters("Other", "Other#a", counters(cache_misses=7, models_loaded=1))
    s = scrape(m)
    model = (("deployment", "Model"),)
    assert only(s, "muxgate_model_loads_total")[model] == 5.0
    assert only(s, "muxgate_model_load_failures_total")[model] == 1.0
    assert only(s, "muxgate_cache_hits_total")[model] == 11.0
    assert only(s, "muxgate_cache_misses_total") == {model: 4.0, (("deployment", "Other"),): 7.0}
    assert only(s, "muxgate_model_load_duration_seconds_sum")[model] == 1.75
    assert only(s, "muxgate_model_load_duration_seconds_count")[model] == 5.0
    assert only(s, "muxgate_model_unloads_total") == {
        (("deployment", "Model"), ("reason", "admin")): 1.0,
        (("deployment", "Model"), ("reason", "drain")): 2.0,
        (("deployment", "Model"), ("reason", "lru")): 1.0,
        (("deployment", "Model"), ("reason", "shutdown")): 0.0,
        (("deployment", "Other"), ("reason", "admin")): 0.0,
        (("deployment", "Other"), ("reason", "drain")): 0.0,
        (("deployment", "Other"), ("reason", "lru")): 0.0,
        (("deployment", "Other"), ("reason", "shutdown")): 0.0,
    }
    assert only(s, "muxgate_models_loaded") == {
        (("deployment", "Model"), ("replica", "Model#a")): 2.0,
        (("deployment", "Model"), ("replica", "Model#b")): 0.0,
        (("deployment", "Other"), ("replica", "Other#a")): 1.0,
    }


def test_forget_replica_keeps_totals_monotonic() -> None:
    m = GatewayMetrics()
    model = (("deployment", "Model"),)
    m.set_replica_counters("Model", "a", counters(model_loads=3, cache_hits=5, models_loaded=3))
    m.set_replica_counters("Model", "b", counters(model_loads=1, cache_hits=1, models_loaded=1))
    assert only(scrape(m), "muxgate_model_loads_total")[model] == 4.0

    m.set_replica_counters("Model", "a", counters(model_loads=4, cache_hits=9, models_loaded=3))
    m.forget_replica("Model", "a")
    s = scrape(m)
    assert only(s, "muxgate_model_loads_total")[model] == 5.0
    assert only(s, "muxgate_cache_hits_total")[model] == 10.0
    # the gauge of a forgotten replica disappears with it
    assert only(s, "muxgate_models_loaded") == {(("deployment", "Model"), ("replica", "b")): 1.0}

    # a replacement replica starts from zero; the total keeps growing
    m.set_replica_counters("Model", "c", counters(model_loads=1))
    assert only(scrape(m), "muxgate_model_loads_total")[model] == 6.0
    m.forget_replica("Model", "b")
    m.forget_replica("Model", "c")
    m.forget_replica("Model", "never-seen")  # harmless
    s = scrape(m)
    assert only(s, "muxgate_model_loads_total")[model] == 6.0
    assert only(s, "muxgate_cache_hits_total")[model] == 10.0
    assert only(s, "muxgate_models_loaded") == {}
    assert "live_replicas=0" in repr(m)


def test_counter_reset_under_same_replica_id_is_not_a_decrease() -> None:
    m = GatewayMetrics()
    model = (("deployment", "Model"),)
    m.set_replica_counters("Model", "a", counters(model_loads=5, cache_misses=5))
    m.set_replica_counters("Model", "a", counters(model_loads=1, cache_misses=6))
    s = scrape(m)
    assert only(s, "muxgate_model_loads_total")[model] == 6.0
    assert only(s, "muxgate_cache_misses_total")[model] == 11.0


def test_unknown_counter_keys_are_ignored_and_missing_ones_are_zero() -> None:
    m = GatewayMetrics()
    m.set_replica_counters("Model", "a", {"something_new": 3.0, "cache_hits": 1.0})
    s = scrape(m)
    assert only(s, "muxgate_cache_hits_total") == {(("deployment", "Model"),): 1.0}
    assert only(s, "muxgate_model_loads_total") == {(("deployment", "Model"),): 0.0}
    assert not any("something_new" in name for name, _ in s)


def test_instances_do_not_share_series() -> None:
    a, b = GatewayMetrics(), GatewayMetrics()
    a.observe_request("Model", 200, 0.01)
    assert only(scrape(b), "muxgate_requests_total") == {}
    assert only(scrape(a), "muxgate_requests_total") == {
        (("deployment", "Model"), ("status", "200")): 1.0
    }


def test_openmetrics_on_request() -> None:
    m = GatewayMetrics()
    m.observe_request("Model", 200, 0.01)
    body, content_type = m.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_cached_children_count_per_label_set_and_from_many_threads() -> None:
    # observe_request resolves each (deployment, status, model) once and
    # reuses the child; values must stay exact per label set, also when
    # threads race to resolve the same new label set.
    import threading

    m = GatewayMetrics(per_model_labels=True)
    barrier = threading.Barrier(4)

    def worker() -> None:
        barrier.wait()
        for i in range(500):
            m.observe_request("Model", 200 if i % 5 else 500, 0.01, f"m{i % 2}")
            m.count_spillover("Model", "m1")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = scrape(m)
    requests = only(s, "muxgate_requests_total")

    def key(status: str, model: str) -> tuple[tuple[str, str], ...]:
        return (("deployment", "Model"), ("model", model), ("status", status))

    assert requests == {
        key("200", "m0"): 800.0,
        key("200", "m1"): 800.0,
        key("500", "m0"): 200.0,
        key("500", "m1"): 200.0,
    }
    counts = only(s, "muxgate_request_duration_seconds_count")
    assert sum(counts.values()) == 2000.0
    assert only(s, "muxgate_spillovers_total") == {
        (("deployment", "Model"), ("model", "m1")): 2000.0
    }
    assert m.requests_seen() == 2000
    assert "requests=2000" in repr(m)

    # Without per-model labels, the model id is not part of the key.
    plain = GatewayMetrics()
    plain.observe_request("Model", 200, 0.01, "m1")
    plain.observe_request("Model", 200, 0.01, "m2")
    assert only(scrape(plain), "muxgate_requests_total") == {
        (("deployment", "Model"), ("status", "200")): 2.0
    }


def test_first_replica_report_creates_zero_queue_and_spillover_series() -> None:
    m = GatewayMetrics()
    assert only(scrape(m), "muxgate_queue_length") == {}
    m.set_replicas("Model", {"starting": 1})
    s = scrape(m)
    assert only(s, "muxgate_queue_length") == {(("deployment", "Model"),): 0.0}
    assert only(s, "muxgate_spillovers_total") == {(("deployment", "Model"),): 0.0}
    # With per-model labels a spillover series needs a model: none is invented.
    per_model = GatewayMetrics(per_model_labels=True)
    per_model.set_replicas("Model", {"running": 1})
    assert only(scrape(per_model), "muxgate_spillovers_total") == {}


def test_final_counters_of_a_drained_replica_count_once() -> None:
    m = GatewayMetrics()
    model = (("deployment", "Model"),)

    def unloads(s: Samples) -> dict[str, float]:
        return {
            dict(labels)["reason"]: value
            for labels, value in only(s, "muxgate_model_unloads_total").items()
        }

    # Polled, then the drain starts (forgotten), then Drained brings the rest.
    m.set_replica_counters("Model", "a", counters(model_loads=2, cache_misses=2, models_loaded=2))
    m.forget_replica("Model", "a")
    m.final_replica_counters(
        "Model", "a", counters(model_loads=3, cache_misses=3, model_unloads_drain=3)
    )
    s = scrape(m)
    assert only(s, "muxgate_model_loads_total")[model] == 3.0
    assert only(s, "muxgate_cache_misses_total")[model] == 3.0
    assert unloads(s) == {"drain": 3.0, "lru": 0.0, "shutdown": 0.0, "admin": 0.0}
    assert only(s, "muxgate_models_loaded") == {}
    # A repeated final report, or a forget after it, adds nothing.
    m.final_replica_counters(
        "Model", "a", counters(model_loads=3, cache_misses=3, model_unloads_drain=3)
    )
    m.forget_replica("Model", "a")
    assert only(scrape(m), "muxgate_model_loads_total")[model] == 3.0

    # Final report while still live (no forget first): the live snapshot is replaced.
    m.set_replica_counters("Model", "b", counters(model_loads=1))
    m.final_replica_counters("Model", "b", counters(model_loads=2, model_unloads_drain=2))
    s = scrape(m)
    assert only(s, "muxgate_model_loads_total")[model] == 5.0
    assert unloads(s)["drain"] == 5.0
    assert "live_replicas=0" in repr(m)

    # Never polled at all (drained within its first second): all of it counts.
    m.final_replica_counters("Model", "c", counters(model_loads=1, cache_hits=4))
    s = scrape(m)
    assert only(s, "muxgate_model_loads_total")[model] == 6.0
    assert only(s, "muxgate_cache_hits_total")[model] == 4.0


def test_replica_load_histograms_merge_into_one_per_deployment() -> None:
    m = GatewayMetrics()
    # Replica a: loads of 0.02 s and 3 s; replica b: one of 400 s (over every bound).
    a = {load_bucket_key(b): float((b >= 0.02) + (b >= 3.0)) for b in MODEL_LOAD_BUCKETS}
    m.set_replica_counters(
        "Model", "Model#a", {**a, "model_loads": 2, "model_load_seconds_sum": 3.02}
    )
    m.set_replica_counters("Model", "Model#b", {"model_loads": 1, "model_load_seconds_sum": 400.0})
    m.forget_replica("Model", "Model#b")  # a gone replica's loads stay in the histogram

    buckets = only(scrape(m), "muxgate_model_load_duration_seconds_bucket")
    got = {dict(labels)["le"]: value for labels, value in buckets.items()}
    assert got["0.01"] == 0.0
    assert got["0.025"] == 1.0
    assert got["2.5"] == 1.0
    assert got["5.0"] == 2.0
    assert got["300.0"] == 2.0
    assert got["+Inf"] == 3.0
    assert len(got) == len(MODEL_LOAD_BUCKETS) + 1
