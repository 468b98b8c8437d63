"""The thin Redis Streams consumer-group runtime (redis-py asyncio + hiredis)."""

from streams.consumer import Entry, GroupConsumer
from streams.spec import StreamSpec

__all__ = ["Entry", "GroupConsumer", "StreamSpec"]
