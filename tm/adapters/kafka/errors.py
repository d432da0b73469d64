"""The one place where librdkafka's errors become tm's (tm.errors), by their error code
(``KafkaError.code()``), never by message text."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from confluent_kafka import KafkaError, KafkaException

from tm.errors import CommitDeferredError, FatalError, KafkaUnavailableError, TmError

P = ParamSpec("P")
T = TypeVar("T")

_FATAL_CODES = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError.MSG_SIZE_TOO_LARGE,  # will never pass: crash loudly rather than loop
        KafkaError._AUTHENTICATION,  # noqa: SLF001 (librdkafka's local error codes)
        KafkaError._INVALID_ARG,  # noqa: SLF001
    }
)
# A commit refused because the group moved to a new generation while we were not polling.
_REBALANCING_CODES = frozenset({KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS})


def text(error: KafkaError) -> str:
    """``NAME: description``, as every log line and error of tm writes a Kafka error."""
    return f"{error.name()}: {error.str()}"


def is_fatal(error: KafkaError) -> bool:
    """An error that retrying will not cure: authorization, authentication, a record too large
    for its topic, a bad configuration, or one librdkafka itself calls fatal."""
    return bool(error.fatal()) or error.code() in _FATAL_CODES


def is_rebalancing(error: KafkaError) -> bool:
    """A commit refused by a rebalance: the offsets can be sent again later."""
    return error.code() in _REBALANCING_CODES


def kafka_error(exc: KafkaException) -> KafkaError | None:
    """The KafkaError a KafkaException carries, if any."""
    error = exc.args[0] if exc.args else None
    return error if isinstance(error, KafkaError) else None


def translate(exc: KafkaException) -> TmError:
    """Fatal (see :func:`is_fatal`) or else KafkaUnavailableError; a refused commit is
    CommitDeferredError."""
    error = kafka_error(exc)
    if error is None:
        return KafkaUnavailableError(str(exc))
    if is_fatal(error):
        return FatalError(text(error))
    if is_rebalancing(error):
        return CommitDeferredError(text(error))
    return KafkaUnavailableError(text(error))


def translated(call: Callable[P, T]) -> Callable[P, T]:
    """Decorate a function of this package: a KafkaException it raises leaves as tm's error."""

    @functools.wraps(call)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return call(*args, **kwargs)
        except KafkaException as exc:
            raise translate(exc) from exc

    return wrapper
