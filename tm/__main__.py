"""Command line: ``tm <command>``. Parses argv, loads the settings once, runs the command.

Exit status: 0 success, 1 failure, 2 bad settings or usage (one line on stderr naming it).

Each command's module is imported when it runs: ``tm run`` is the supervisor, which forks the
workers and must not load the Kafka or PostgreSQL clients (nor start an OTLP exporter) first.
"""

from __future__ import annotations

import argparse
import faulthandler
import signal
import sys

from tm import config
from tm.errors import ConfigError, TmError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tm", description="Task manager of the web-crawl system")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    db = sub.add_parser("db", help="database schema").add_subparsers(
        dest="db_command", required=True, metavar="db-command"
    )
    db.add_parser("migrate", help="apply pending migrations (a second run does nothing)")
    prune = db.add_parser(
        "prune", help="delete finished tasks older than the retention period, in small batches"
    )
    prune.add_argument(
        "--days", type=int, default=None, help="retention in days (default TM_RETENTION_DAYS)"
    )
    prune.add_argument("--dry-run", action="store_true", help="count, do not delete")
    prune.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="rows read per batch, one transaction each (default 5000)",
    )
    prune.add_argument(
        "--pause", type=float, default=None, help="seconds between batches (default 0.2)"
    )

    sub.add_parser("run", help="consume task events: the supervisor and its workers")
    send = sub.add_parser("send", help="sample traffic in the producers' wire format")
    send.add_argument("kind", choices=["new", "updates"], help="new tasks, or updates of new ones")
    send.add_argument("--count", type=int, default=10, help="how many messages (default 10)")
    send.add_argument("--rate", type=float, default=None, help="messages per second (default: max)")
    send.add_argument(
        "--error-ratio", type=float, default=0.2, help="updates: share of `error` (default 0.2)"
    )
    dlq = sub.add_parser("dlq", help="dead letters").add_subparsers(
        dest="dlq_command", required=True, metavar="dlq-command"
    )
    replay = dlq.add_parser("replay", help="put dead letters back on their source topic")
    replay.add_argument("--reason", default=None, help="only dead letters of this dlq_reason")
    replay.add_argument("--dry-run", action="store_true", help="count, do not produce")
    check = sub.add_parser("check", help="say whether PostgreSQL and Kafka answer; non-zero if not")
    check.add_argument(
        "--config-only",
        action="store_true",
        help="only parse the settings from the environment (exit 2 naming a bad one); "
        "contact nothing",
    )

    watch = sub.add_parser("watch", help="follow the task-event feed (REDIS_URL) and print it")
    watch.add_argument("task_id", nargs="?", default=None, help="only this task (its channel)")
    watch.add_argument("--count", type=int, default=None, help="stop after this many events")

    topics = sub.add_parser("topics", help="Kafka topics").add_subparsers(
        dest="topics_command", required=True, metavar="topics-command"
    )
    create = topics.add_parser("create", help="create task-status, requests and DLQ topics")
    create.add_argument(
        "--partitions", type=int, default=None, help="partition count (TM_TOPIC_PARTITIONS)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = config.load()
        if args.command == "run":
            from tm import supervisor
            from tm.observability import logs

            # The console and files only: each child builds its own OTLP exporter after the fork.
            logs.setup(settings.log, settings.otel, environment=settings.environment, export=False)
            # `kill -USR1 <pid>` of the supervisor or of any child (they inherit it): every
            # thread's stack on stderr, for a process that seems stuck.
            faulthandler.register(signal.SIGUSR1, all_threads=True)
            return supervisor.run(settings)
        if args.command == "send":
            from tm import traffic

            if args.count < 0:
                raise ConfigError("--count", str(args.count), "a non-negative integer")
            if args.kind == "new":
                sent = traffic.send_new(settings, args.count, args.rate)
            else:
                sent = traffic.send_updates(settings, args.count, args.error_ratio, args.rate)
            print(f"sent {sent} {args.kind} message(s) to {settings.kafka.task_status_topic}")
            return 0
        if args.command == "dlq":
            from tm import dlq
            from tm.core.messages import Reason

            reasons = [r.value for r in Reason]
            if args.reason is not None and args.reason not in reasons:
                raise ConfigError("--reason", args.reason, "one of " + ", ".join(reasons))
            result = dlq.replay(settings, reason=args.reason, dry_run=args.dry_run)
            verb = "would replay" if args.dry_run else "replayed"
            print(
                f"{verb} {result.replayed} dead letter(s) from {settings.kafka.dlq_topic}"
                f" (skipped {result.skipped} with another reason)"
            )
            return 0
        if args.command == "db":
            from tm import commands

            if args.db_command == "prune":
                return _db_prune(args, settings)
            return commands.db_migrate(settings)
        if args.command == "check":
            from tm import commands

            if args.config_only:
                return commands.check_config(settings)
            return commands.check(settings)
        if args.command == "watch":
            from tm import watch

            return watch.watch(settings, args.task_id, limit=args.count)
        if args.command == "topics":
            if args.partitions is not None and args.partitions < 1:
                raise ConfigError("--partitions", str(args.partitions), "a positive integer")
            from tm import commands

            return commands.topics_create(settings, args.partitions)
    except ConfigError as exc:
        print(f"tm: {exc}", file=sys.stderr)
        return 2
    except TmError as exc:
        print(f"tm: {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unhandled command {args.command!r}")


def _db_prune(args: argparse.Namespace, settings: config.Settings) -> int:
    from tm import commands
    from tm.adapters import retention

    if args.days is not None and not 1 <= args.days <= config.MAX_RETENTION_DAYS:
        raise ConfigError("--days", str(args.days), f"an integer in 1..{config.MAX_RETENTION_DAYS}")
    batch_size = retention.BATCH_SIZE if args.batch_size is None else args.batch_size
    if not 1 <= batch_size <= retention.MAX_BATCH_SIZE:
        raise ConfigError(
            "--batch-size", str(batch_size), f"an integer in 1..{retention.MAX_BATCH_SIZE}"
        )
    pause_s = retention.PAUSE_S if args.pause is None else args.pause
    if not 0 <= pause_s <= retention.MAX_PAUSE_S:
        raise ConfigError("--pause", str(pause_s), f"seconds in 0..{retention.MAX_PAUSE_S:g}")
    return commands.db_prune(
        settings, days=args.days, batch_size=batch_size, pause_s=pause_s, is_dry_run=args.dry_run
    )


if __name__ == "__main__":
    sys.exit(main())
