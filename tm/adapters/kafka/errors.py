"""The one place where librdkafka's errors become tm's (tm.errors), by their error code
(``KafkaError.code()``). The one exception is a refused broker certificate, which librdkafka
reports as _TRANSPORT instead of _SSL when the handshake fails on a write: it is told by
OpenSSL's reason, as librdkafka itself tells it."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from types import TracebackType

from confluent_kafka import KafkaError, KafkaException

from tm.connections import KafkaSettings
from tm.errors import CommitDeferredError, FatalError, FencedError, KafkaUnavailableError, TmError

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
# Another process has this member's static group instance id, as the consumer hears it: the
# broker's code, and the one it reports it with (librdkafka: a consumer's only fatal error is
# this one, _FATAL on every call from then on). Only the consumer's: a transaction's offsets
# refused with FENCED_INSTANCE_ID carry the group metadata of before this member's own rejoin
# (its session timed out while the broker was out of reach), which librdkafka makes abortable.
# A producer fenced by a newer one with its transactional id is only fatal: the broker also
# fences a producer whose transaction outlived the transaction timeout, and a restarted worker
# is then the cure.
_CONSUMER_FENCED_CODES = frozenset({KafkaError.FENCED_INSTANCE_ID, KafkaError._FATAL})  # noqa: SLF001
# A commit refused because the group moved to a new generation while we were not polling.
_REBALANCING_CODES = frozenset({KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS})


def text(error: KafkaError) -> str:
    """``NAME: description``, as every log line and error of tm writes a Kafka error."""
    return f"{error.name()}: {error.str()}"


def is_fatal(error: KafkaError) -> bool:
    """An error that retrying will not cure: authorization, authentication, a record too large
    for its topic, a bad configuration, or one librdkafka itself calls fatal."""
    return bool(error.fatal()) or error.code() in _FATAL_CODES


def is_fenced(error: KafkaError, *, consumer: bool = False) -> bool:
    """Another process took the static instance id: only a consumer's error says so."""
    return consumer and error.code() in _CONSUMER_FENCED_CODES


def fatal(error: KafkaError, context: str = "", *, consumer: bool = False) -> FatalError:
    """The FatalError for ``error`` (FencedError when another process took the identity)."""
    message = f"{context}: {text(error)}" if context else text(error)
    return FencedError(message) if is_fenced(error, consumer=consumer) else FatalError(message)


def is_rebalancing(error: KafkaError) -> bool:
    """A commit refused by a rebalance: the offsets can be sent again later."""
    return error.code() in _REBALANCING_CODES


def kafka_error(exc: KafkaException) -> KafkaError | None:
    """The KafkaError a KafkaException carries, if any."""
    error = exc.args[0] if exc.args else None
    return error if isinstance(error, KafkaError) else None


def kafka_exception(exc: BaseException | None) -> KafkaException | None:
    """``exc`` if it is a KafkaException, or the one it was raised from when it is the
    SystemError confluent-kafka raises when a callback of ours runs while its own error is
    already set (a flush of a fenced producer serving a delivery report)."""
    if isinstance(exc, KafkaException):
        return exc
    if isinstance(exc, SystemError) and isinstance(exc.__cause__, KafkaException):
        return exc.__cause__
    return None


def translate(exc: KafkaException, *, consumer: bool = False) -> TmError:
    """Fatal (see :func:`is_fatal`; fenced, see :func:`is_fenced`) or else
    KafkaUnavailableError; a refused commit is CommitDeferredError."""
    error = kafka_error(exc)
    if error is None:
        return KafkaUnavailableError(str(exc))
    if is_fatal(error) or is_fenced(error, consumer=consumer):
        return fatal(error, consumer=consumer)
    if is_rebalancing(error):
        return CommitDeferredError(text(error))
    return KafkaUnavailableError(text(error))


def _refused_credentials(error: KafkaError) -> bool:
    return error.code() in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED)  # noqa: SLF001


# OpenSSL's "certificate verify failed" (3.x, then 1.1), as librdkafka recognises it.
_VERIFY_FAILED = ("error:0A000086", "certificate verify failed")


def _refused_certificate(error: KafkaError) -> bool:
    """tm refused the broker's certificate: _SSL, or _TRANSPORT carrying OpenSSL's reason."""
    if error.code() == KafkaError._SSL:  # noqa: SLF001
        return True
    return error.code() == KafkaError._TRANSPORT and any(  # noqa: SLF001
        reason in error.str() for reason in _VERIFY_FAILED
    )


def connection_problem(settings: KafkaSettings, errors: Sequence[KafkaError]) -> str:
    """Why no broker answered, in one line that starts with the settings that decide it: a
    refused credential or certificate if the client reported one while trying, else the first
    error it reported, else what is left to check."""
    telling = [e for e in errors if e.code() != KafkaError._ALL_BROKERS_DOWN]  # noqa: SLF001
    if not telling:
        return (
            f"KAFKA_BROKERS, KAFKA_SECURITY_PROTOCOL: no broker answered at"
            f" {','.join(settings.brokers)} over {settings.security_protocol.upper()} (down,"
            " unreachable, or speaking another protocol)"
        )
    error = next(
        (e for e in telling if _refused_credentials(e) or _refused_certificate(e)), telling[0]
    )
    if _refused_credentials(error):
        names = (
            "KAFKA_SASL_OAUTHBEARER_CLIENT_ID, KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET"
            if settings.sasl_mechanism == "oauthbearer"
            else "KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD"
        ) + ", KAFKA_SASL_MECHANISM"
    elif _refused_certificate(error):  # the broker's certificate: its CA, or its host name
        names = "KAFKA_SSL_CA_LOCATION, KAFKA_SSL_VERIFY_HOSTNAME, KAFKA_BROKERS"
    elif settings.uses_ssl:  # the broker ended the handshake: a client certificate it refused
        names = "KAFKA_SSL_CERTIFICATE_LOCATION, KAFKA_SSL_KEY_LOCATION, KAFKA_SECURITY_PROTOCOL"
    else:
        names = "KAFKA_BROKERS, KAFKA_SECURITY_PROTOCOL"
    return f"{names}: {text(error)}"


def check_event(error: KafkaError) -> None:
    """An error event the consumer polled instead of a message: raise FatalError when it means
    the worker cannot go on (see :func:`is_fatal`, or its topic is gone); else it is passing
    (a broker went away, a fetch failed) and the caller logs it."""
    if (
        is_fatal(error)
        or is_fenced(error, consumer=True)
        or error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART
    ):
        raise fatal(error, "consumer", consumer=True)


class _Translated(contextlib.ContextDecorator):
    """A KafkaException that leaves the block or the function leaves as tm's error
    (:func:`translate`; ``consumer``: the consumer's calls, whose _FATAL means fenced).
    Stateless, so one instance serves every use, nested or not."""

    def __init__(self, *, consumer: bool = False) -> None:
        self._consumer = consumer

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        cause = kafka_exception(exc)
        if cause is not None:
            raise translate(cause, consumer=self._consumer) from exc


# The one way a call of this package's clients is guarded: ``@translated`` on a function, or
# ``with translated:`` around a block (a generator's body, a hot loop, a callback); the worker's
# consumer uses ``consumer_translated``.
translated = _Translated()
consumer_translated = _Translated(consumer=True)
