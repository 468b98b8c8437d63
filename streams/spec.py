"""One frozen object per consumer-group contract; bad combinations fail at start-up."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StreamSpec:
    stream: str
    group: str
    consumer: str
    count: int = 500  # XREADGROUP COUNT
    block_ms: int = 1000  # XREADGROUP BLOCK; also bounds SIGTERM reaction time
    min_idle_ms: int = 30_000  # pending entries idle longer than this are reclaimed
    reclaim_interval_s: float = 5.0
    max_deliveries: int = 5  # delivered this many times without an ack -> dead letter
    start_id: str = "0"  # where a newly created group starts ("0" = whole stream, "$" = new)
    dead_letter_maxlen: int = 100_000

    def __post_init__(self) -> None:
        if not self.stream or not self.group or not self.consumer:
            raise ValueError("StreamSpec needs stream, group and consumer names")
        if self.count < 1:
            raise ValueError(f"count must be >= 1, got {self.count}")
        if self.block_ms < 1:
            raise ValueError(f"block_ms must be >= 1 (0 blocks forever), got {self.block_ms}")
        if self.min_idle_ms < 1:
            raise ValueError(f"min_idle_ms must be >= 1, got {self.min_idle_ms}")
        if self.max_deliveries < 1:
            raise ValueError(f"max_deliveries must be >= 1, got {self.max_deliveries}")
        if self.reclaim_interval_s <= 0:
            raise ValueError("reclaim_interval_s must be > 0")
