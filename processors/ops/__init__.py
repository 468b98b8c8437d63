"""Operations: the ``massive-pipeline`` CLI, the demo, epoch tools, record/replay, flat-file
import and the Redis-state monitor."""
