"""What operators see of the model replicas, through Ray's metrics: each node's metrics agent exports
them in Prometheus format on the node's metrics export port (`ray start --metrics-export-port`), where
the Ray dashboard's Grafana and any Prometheus scrape them. Ray prefixes every name with `ray_`; Serve
adds the deployment, replica and application tags.

    odyssey_time_to_first_token_seconds      histogram, by task
    odyssey_time_per_output_token_seconds    histogram, by task (after the first token)
    odyssey_request_latency_seconds          histogram, by task (arrival to last token or result)
    odyssey_queue_wait_seconds               histogram, by task (arrival to admission into the batch)
    odyssey_running_sequences                gauge: sequences in the batch
    odyssey_waiting_requests                 gauge: requests queued in the engine
    odyssey_kv_cache_usage                   gauge: fraction of the KV cache's positions in use
    odyssey_prompt_tokens                    counter, by task and API key id
    odyssey_generated_tokens                 counter, by task and API key id (a cancelled stream counts
                                             the tokens it did generate)
    odyssey_cancelled_requests               counter, by task: callers that went away mid-generation
    odyssey_refused_requests                 counter, by task: refused because the engine's queue was full

The API key id is a short hash of the key (serve/api_keys.py `key_id`), never the key.
"""

from __future__ import annotations

from ray.serve import metrics

from odyssey.engine import Event

SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
PER_TOKEN = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]


class EngineMetrics:
    def __init__(self) -> None:
        def histogram(name: str, description: str, boundaries: list[float]) -> metrics.Histogram:
            return metrics.Histogram(name, description, boundaries=boundaries, tag_keys=("task",))

        def counter(name: str, description: str, *tags: str) -> metrics.Counter:
            return metrics.Counter(name, description, tag_keys=tags)

        self.ttft = histogram("odyssey_time_to_first_token_seconds", "Arrival to first token", SECONDS)
        self.tpot = histogram("odyssey_time_per_output_token_seconds", "Seconds per later token", PER_TOKEN)
        self.e2e = histogram(
            "odyssey_request_latency_seconds", "Arrival to the last token or result", SECONDS
        )
        self.queue = histogram("odyssey_queue_wait_seconds", "Arrival to admission into the batch", SECONDS)
        self.running = metrics.Gauge("odyssey_running_sequences", "Sequences in the batch")
        self.waiting = metrics.Gauge("odyssey_waiting_requests", "Requests queued in the engine")
        self.kv = metrics.Gauge("odyssey_kv_cache_usage", "Fraction of KV cache positions in use")
        self.prompt_tokens = counter("odyssey_prompt_tokens", "Prompt tokens", "task", "key_id")
        self.generated = counter("odyssey_generated_tokens", "Generated tokens", "task", "key_id")
        self.cancelled = counter("odyssey_cancelled_requests", "Callers gone mid-generation", "task")
        self.refused_ = counter("odyssey_refused_requests", "Refused: the engine's queue was full", "task")

    def finished(self, task: str, key_id: str, event: Event) -> None:
        """A request's last event (a cancelled generation's too)."""
        task = task or "unknown"
        timing, tags = event.timing, {"task": task}
        self.e2e.observe(timing.e2e_s, tags)
        self.queue.observe(timing.queue_s, tags)
        if timing.ttft_s is not None:
            self.ttft.observe(timing.ttft_s, tags)
        if timing.tpot_s is not None:
            self.tpot.observe(timing.tpot_s, tags)
        chunk, by_key = event.chunk, {"task": task, "key_id": key_id or "none"}
        if chunk is None:  # scoring, embedding: what the model read
            self.prompt_tokens.inc(event.request.tokens, by_key)
        else:
            self.prompt_tokens.inc(chunk.prompt_tokens, by_key)
            if chunk.completion_tokens:
                self.generated.inc(chunk.completion_tokens, by_key)
            if chunk.finish_reason == "cancelled":
                self.cancelled.inc(1, tags)

    def refused(self, task: str) -> None:
        self.refused_.inc(1, {"task": task})

    def engine(self, stats: dict) -> None:
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.kv.set(stats["kv_cache_used"])
