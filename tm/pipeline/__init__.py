"""The pipeline of one worker: decode, apply, publish, acknowledge (:mod:`.stages`), what they
drive (:mod:`.ports`), what they hand each other and record (:mod:`.record`), what a batch
produces (:mod:`.publish`)."""

from tm.pipeline.ports import Database, Sink, TaskEventSink, TransactionOffsets
from tm.pipeline.record import NO_TRACE, NO_TRACER, BatchRecord, Decoded, Trace, Tracer
from tm.pipeline.stages import DEAD_LETTER_MAX_BYTES, Applied, Pipeline, Published, RunIo

__all__ = [
    "DEAD_LETTER_MAX_BYTES",
    "NO_TRACE",
    "NO_TRACER",
    "Applied",
    "BatchRecord",
    "Database",
    "Decoded",
    "Pipeline",
    "Published",
    "RunIo",
    "Sink",
    "TaskEventSink",
    "Trace",
    "Tracer",
    "TransactionOffsets",
]
