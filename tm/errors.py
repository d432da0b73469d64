"""The exception tree of tm, branched by what the pipeline must do, not by which library failed.

::

    TmError
    ├── ConfigError                 bad settings: exit at startup (status 2), no restart
    ├── InvalidMessageError         never succeeds: dead-letter it, commit past it
    │   ├── MalformedMessageError   headers/body fail the schema
    │   └── RowRejectedError        SQLSTATE 22xxx, 23xxx, P0001 for one row
    ├── TransientError              retry the batch with backoff; commit nothing
    │   ├── DatabaseUnavailableError  08xxx, 40001, 40P01, 53xxx, 57P01-03, timeouts
    │   └── KafkaUnavailableError
    │       └── CommitDeferredError   a commit lost a race with a rebalance: retry it later
    └── FatalError                  broken invariant or bad deploy (42xxx): the worker exits
        └── MigrationError          the schema on disk and in the database disagree

Foreign errors (asyncpg, confluent-kafka) are translated into this tree once, at the edge, in
``tm.adapters``, by error code and never by message text. This module imports nothing from tm.
"""

from __future__ import annotations


class TmError(Exception):
    """Base of every error tm raises on purpose."""


class ConfigError(TmError):
    """A setting has a bad value. ``str()`` is the one line printed before exiting with status 2."""

    def __init__(self, variable: str, value: str, expected: str) -> None:
        self.variable = variable
        self.value = value
        self.expected = expected
        super().__init__(f"{variable}={value!r} is invalid: expected {expected}")


class InvalidMessageError(TmError):
    """A message that can never succeed; it goes to the dead-letter topic with ``reason``."""

    reason = "invalid_body"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        if reason is not None:
            self.reason = reason
        super().__init__(message)


class MalformedMessageError(InvalidMessageError):
    """Headers or body fail the schema (reasons ``invalid_json``, ``invalid_headers``, ...)."""


class RowRejectedError(InvalidMessageError):
    """PostgreSQL refused one row for a data reason (SQLSTATE class 22 or 23, or P0001)."""

    reason = "row_rejected"

    def __init__(self, message: str, *, sqlstate: str) -> None:
        self.sqlstate = sqlstate
        super().__init__(f"{message} (SQLSTATE {sqlstate})")


class TransientError(TmError):
    """A failure that may pass: commit nothing, seek back, back off, retry."""


class DatabaseUnavailableError(TransientError):
    """PostgreSQL is unreachable, overloaded, restarting, or the call timed out."""

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        self.sqlstate = sqlstate
        super().__init__(message)


class KafkaUnavailableError(TransientError):
    """The broker did not answer or refused a request that may succeed later."""


class PartitionsGoneError(TransientError):
    """Exactly-once: a partition of a batch in flight was revoked or lost; the batch's outputs
    must not be committed (the partition's new owner publishes them), so it is retried."""

    cause = "partitions_gone"  # for tm_transactions_total{cause}


class CommitDeferredError(KafkaUnavailableError):
    """The broker refused a commit because the group is rebalancing (ILLEGAL_GENERATION,
    REBALANCE_IN_PROGRESS): the batch is done; its offsets go with the next commit."""


class FatalError(TmError):
    """A broken invariant or a bad deploy (for example SQLSTATE 42xxx): the worker exits."""


class FencedError(FatalError):
    """Another process took this worker's identity (its static group instance id): this one
    must stop for good, not restart and fence the other back."""


class MigrationError(FatalError):
    """The migrations on disk and the ledger in the database disagree."""
