"""The Kafka edge: the only part of tm that imports confluent-kafka.

- :mod:`~tm.adapters.kafka.clients`: the clients' configuration (shared, consumer, producer);
- :mod:`~tm.adapters.kafka.errors`: librdkafka's errors translated to tm's, in one place;
- :mod:`~tm.adapters.kafka.admin`: metadata, the topics' record limits, topic creation;
- :mod:`~tm.adapters.kafka.consumer`: the worker's consumer (:class:`KafkaSource`);
- :mod:`~tm.adapters.kafka.producer`: the worker's producer (:class:`KafkaSink`);
- :mod:`~tm.adapters.kafka.transactions`: its exactly-once variant
  (:class:`TransactionalSink`);
- :mod:`~tm.adapters.kafka.tools`: the clients of the operator commands and of the API's lag
  watcher.

librdkafka is not fork-safe: nothing here may be created before a worker forks, and the
supervisor never imports this package.
"""

from tm.adapters.kafka.admin import (
    ClusterInfo,
    create_topics,
    describe,
    produce_limit,
)
from tm.adapters.kafka.clients import (
    client_config,
    consumer_config,
    producer_config,
    transactional_id,
)
from tm.adapters.kafka.consumer import Assignment, KafkaSource
from tm.adapters.kafka.producer import KafkaSink
from tm.adapters.kafka.transactions import TransactionAbortedError, TransactionalSink

__all__ = [
    "Assignment",
    "ClusterInfo",
    "KafkaSink",
    "KafkaSource",
    "TransactionAbortedError",
    "TransactionalSink",
    "client_config",
    "consumer_config",
    "create_topics",
    "describe",
    "produce_limit",
    "producer_config",
    "transactional_id",
]
