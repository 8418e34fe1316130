"""Prometheus text exposition (format 0.0.4), written by hand: counters, gauges, histograms."""
from __future__ import annotations

import bisect
import collections

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, name: str, help: str, buckets=LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last is +Inf
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip(self.buckets + (float("inf"),), self.counts):
            cumulative += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{self.name}_bucket{{le="{le}"}} {cumulative}')
        out += [f"{self.name}_sum {self.sum!r}", f"{self.name}_count {self.count}"]
        return out


class Metrics:
    """What the HTTP side counts; the engine's own counters are read at render time."""

    def __init__(self):
        self.requests = collections.Counter()  # (endpoint, status) -> count
        self.time_to_first_token = Histogram("qwen2_time_to_first_token_seconds",
                                             "Time from a generation request's arrival to its first text.")
        self.request_duration = Histogram("qwen2_request_duration_seconds",
                                          "Time from a generation request's arrival to its last byte.")

    def render(self, engine) -> str:
        lines = ["# HELP qwen2_requests_total Requests answered, by endpoint and HTTP status.",
                 "# TYPE qwen2_requests_total counter"]
        for (endpoint, status), n in sorted(self.requests.items()):
            lines.append(f'qwen2_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        for name, kind, help, value in [
            ("qwen2_prompt_tokens_total", "counter", "Prompt tokens prefilled.", engine.prompt_tokens),
            ("qwen2_generation_tokens_total", "counter", "Tokens generated.", engine.generated_tokens),
            ("qwen2_decode_steps_total", "counter", "Batched decode steps run.", engine.decode_steps),
            ("qwen2_decode_rows_total", "counter", "Sequences decoded, summed over decode steps.", engine.decode_rows),
            ("qwen2_queue_depth", "gauge", "Requests waiting for a free slot.", engine.queue_depth),
            ("qwen2_running_sequences", "gauge", "Sequences in the running batch.", engine.running),
            ("qwen2_free_slots", "gauge", "Free sequence slots in the KV cache.", engine.free_slots),
            ("qwen2_kv_cache_bytes", "gauge", "Bytes reserved for the KV slot pool.", engine.kv_bytes),
        ]:
            lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {value}"]
        lines += self.time_to_first_token.lines() + self.request_duration.lines()
        return "\n".join(lines) + "\n"
