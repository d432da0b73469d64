"""A worker process (forked by the supervisor, one per partition set):

- :mod:`~tm.worker.process`: the process: connect, build the clients, run, drain, close;
- :mod:`~tm.worker.consume`: the consume loop, its three overlapping stages and the
  rebalance and commit callbacks;
- :mod:`~tm.worker.threads`: the poll and io threads, each call bounded;
- :mod:`~tm.worker.report`: the metrics of an acknowledged batch.
"""

from tm.worker.process import Worker, main

__all__ = ["Worker", "main"]
