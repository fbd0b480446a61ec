"""Prometheus metrics of the gateway, with stable names (documented in docs/api.md)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rayinfer_requests", "Finished requests by endpoint, model "
                                "and HTTP status", ["endpoint", "model", "status"], registry=r)
        self.ttft = Histogram("rayinfer_time_to_first_token_seconds", "Time to first token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("rayinfer_inter_token_latency_seconds", "Time between tokens",
                             ["model"], buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("rayinfer_e2e_request_latency_seconds", "Whole request latency",
                             ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.generated = Counter("rayinfer_generation_tokens", "Tokens generated", ["model"],
                                 registry=r)
        self.prompt = Counter("rayinfer_prompt_tokens", "Prompt tokens read", ["model"],
                              registry=r)
        self.retries = Counter("rayinfer_request_retries", "Requests moved to another actor "
                               "after a failure", ["model"], registry=r)
        self.in_flight = Gauge("rayinfer_requests_in_flight", "Requests open in the gateway",
                               registry=r)
        self.actors = Gauge("rayinfer_actors", "Registered inference actors", ["model", "state"],
                            registry=r)
        self.actor_load = Gauge("rayinfer_actor_outstanding_requests", "Requests routed to an "
                                "actor and not finished (its queue)", ["model", "node", "actor"],
                                registry=r)

    def set_actors(self, actors: list[dict]) -> None:
        self.actors.clear()
        self.actor_load.clear()
        for actor in actors:
            self.actors.labels(actor["model"], actor["state"]).inc()
            self.actor_load.labels(actor["model"], actor["node_label"],
                                   actor["actor_id"][:8]).set(actor["load"])
