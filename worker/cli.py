"""The ``clip-worker`` command: ``run``, ``serve``, ``produce``, ``tail``, ``query``, ``fleet``, ``demo``,
``bench``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, get_args, get_origin

from pydantic import SecretStr

from worker.config import Settings, env_name, flag_name, load_settings
from worker.errors import ExitCode, StartupError
from worker.ops.logs import configure_logging

CONNECTION_FIELDS = (
    "bootstrap_servers",
    "client_id",
    "kafka_client",
    "security_protocol",
    "sasl_mechanism",
    "sasl_username",
    "sasl_password",
    "sasl_password_file",
    "ssl_cafile",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_password",
    "ssl_password_file",
    "max_message_bytes",
    "connect_timeout_s",
    "log_level",
    "log_format",
)
MODEL_FIELDS = ("model", "model_dir", "local_files_only", "random_weights", "device", "dtype")
# `serve`: every setting of `run` that shapes a vector or its preparation (model, preprocessing, scores,
# fetching, batching), its own --serve-* ones, and none of Kafka's.
SERVE_FIELDS = (
    *MODEL_FIELDS,
    "compile",
    "score",
    "aesthetic_head",
    "nsfw_head",
    "batch_size",
    "batch_timeout_ms",
    "decode_workers",
    "inference_threads",
    "max_message_bytes",
    "max_image_pixels",
    "min_image_side",
    "jpeg_draft",
    "resize",
    "decode",
    *(name for name in Settings.model_fields if name.startswith(("fetch_", "s3_", "serve"))),
    "shutdown_grace_s",
    "log_level",
    "log_format",
)


def add_settings_arguments(parser: argparse.ArgumentParser, fields: Iterable[str]) -> None:
    """Add one flag per settings field; defaults are None so unset flags fall back to env vars."""
    group = parser.add_argument_group("settings (each also an environment variable)")
    for name in fields:
        info = Settings.model_fields[name]
        help_text = f"{info.description} [env {env_name(name)}; default {_show_default(info.default)}]"
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
        if info.annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(info.annotation) is tuple:
            # Repeatable, each a name or a comma list: settings validate and merge them.
            kwargs["action"] = "append"
            kwargs["metavar"] = "NAME[,NAME]"
        else:
            choices = _literal_choices(info.annotation)
            if choices:
                kwargs["choices"] = choices
                kwargs["metavar"] = "{" + ",".join(choices) + "}"
        group.add_argument(flag_name(name), **kwargs)


def _literal_choices(annotation: Any) -> list[str] | None:
    values = [a for a in get_args(annotation) if isinstance(a, str)]
    if not values:
        for arg in get_args(annotation):
            values += [a for a in get_args(arg) if isinstance(a, str)]
    return values or None


def _show_default(value: Any) -> str:
    if isinstance(value, SecretStr) or value in (None, ()):
        return "unset"
    return str(value)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from parsed flags over the environment."""
    given = {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}
    return load_settings(given)


def _cmd_run(args: argparse.Namespace) -> int:
    from worker.loop.service import run_worker

    settings = settings_from_args(args)
    configure_logging(settings.log_level, settings.log_format)
    return run_worker(settings)


def _cmd_serve(args: argparse.Namespace) -> int:
    from worker.serving.server import run_serve

    settings = settings_from_args(args)
    configure_logging(settings.log_level, settings.log_format)
    return run_serve(settings)


def _cmd_produce(args: argparse.Namespace) -> int:
    from worker.commands.produce_tail import produce_paths

    settings = settings_from_args(args)
    configure_logging(settings.log_level, settings.log_format)
    sent = produce_paths(settings, args.paths, partitions=args.partitions, by_reference=args.by_reference)
    print(f"published {sent} image record(s) to {settings.input_topic}")
    return 0


def _cmd_tail(args: argparse.Namespace) -> int:
    from worker.commands.produce_tail import tail_topic

    settings = settings_from_args(args)
    configure_logging(settings.log_level, settings.log_format)
    tail_topic(
        settings,
        dlq=args.dlq,
        max_records=args.max_records,
        idle_timeout_s=args.idle_timeout_s,
        read_committed=args.read_committed,
    )
    return 0


def _cmd_query(args: argparse.Namespace) -> int:
    from worker.commands.query import query_text

    settings = settings_from_args(args)
    configure_logging(settings.log_level, settings.log_format)
    print(json.dumps(query_text(settings, args.text, full=args.full)))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from worker.devtools.demo import run_demo

    configure_logging("warning")
    return run_demo(args.count, args.batch_size, args.device, args.dtype, args.kafka_client)


def _cmd_fleet(args: argparse.Namespace) -> int:
    from worker.commands.fleet import parse_gpus, plan_slots, run_fleet

    configure_logging("info")
    run_args = [a for a in args.run_args if a != "--"]
    slots = plan_slots(parse_gpus(args.gpus), args.per_gpu, args.cpu_processes, args.metrics_port_base)
    return run_fleet(slots, run_args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from worker.devtools.bench.runner import run_bench

    configure_logging("warning")
    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    """The full command-line interface."""
    parser = argparse.ArgumentParser(
        prog="clip-worker",
        description="Embed images and texts from Kafka with CLIP-family models (CLIP ViT-L/14 by default).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the long-lived worker")
    add_settings_arguments(run, Settings.model_fields)
    run.set_defaults(handler=_cmd_run)

    serve = commands.add_parser(
        "serve", help="an OpenAI-compatible embeddings API for queries, with the worker's model (no Kafka)"
    )
    add_settings_arguments(serve, SERVE_FIELDS)
    serve.set_defaults(handler=_cmd_serve)

    produce = commands.add_parser("produce", help="publish image files and folders as request records")
    produce.add_argument("paths", nargs="*", help="image files or folders (recursive)")
    produce.add_argument("--partitions", type=int, default=None, help="create the topic with N partitions")
    produce.add_argument(
        "--by-reference",
        metavar="BASE",
        default=None,
        help="publish URIs instead of bytes: each file's relative path under BASE, the URL the folder is "
        "served at (http://host/images/) or the S3 prefix it is copied to (s3://bucket/prefix/); with no "
        "paths, every object under the S3 prefix BASE",
    )
    add_settings_arguments(produce, (*CONNECTION_FIELDS, "input_topic", "s3_endpoint_url", "s3_region"))
    produce.set_defaults(handler=_cmd_produce)

    tail = commands.add_parser("tail", help="print output records as JSON lines")
    tail.add_argument("--dlq", action="store_true", help="tail the dead-letter topic instead")
    tail.add_argument("--max-records", type=int, default=None, help="stop after N records")
    tail.add_argument("--idle-timeout-s", type=float, default=None, help="stop after N idle seconds")
    tail.add_argument(
        "--read-committed",
        action="store_true",
        help="skip records of aborted transactions (what consumers of an --exactly-once worker see)",
    )
    add_settings_arguments(tail, (*CONNECTION_FIELDS, "output_topic", "dlq_topic"))
    tail.set_defaults(handler=_cmd_tail)

    query = commands.add_parser(
        "query", help="print one text's embedding (the model's text tower) as JSON, without Kafka"
    )
    query.add_argument("text", help='the text to embed, e.g. "a photo of a dog"')
    query.add_argument(
        "--full", action="store_true", help="print the whole vector, not only its first values"
    )
    add_settings_arguments(query, (*MODEL_FIELDS, "log_level", "log_format"))
    query.set_defaults(handler=_cmd_query)

    fleet = commands.add_parser(
        "fleet", help="N worker processes in one group on this host, each pinned to a device"
    )
    fleet.add_argument("--gpus", default="all", help="all, none, or GPU indices such as 0,1 (default all)")
    fleet.add_argument("--per-gpu", type=int, default=1, help="worker processes per GPU (default 1)")
    fleet.add_argument("--cpu-processes", type=int, default=1, help="worker processes when no GPU is used")
    fleet.add_argument(
        "--metrics-port-base", type=int, default=9400, help="worker k serves metrics on base+k; 0 disables"
    )
    fleet.add_argument("run_args", nargs=argparse.REMAINDER, help="-- then flags for every `clip-worker run`")
    fleet.set_defaults(handler=_cmd_fleet)

    demo = commands.add_parser("demo", help="local broker + sample images + worker, then a summary")
    demo.add_argument("--count", type=int, default=48, help="sample images to embed")
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument("--device", default="auto")
    demo.add_argument("--dtype", default="auto")
    demo.add_argument("--kafka-client", default="kafka-python", choices=("kafka-python", "librdkafka"))
    demo.set_defaults(handler=_cmd_demo)
    bench = commands.add_parser("bench", help="throughput benchmarks: a table and JSON")
    from worker.devtools.bench.args import add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(handler=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except StartupError as exc:
        print(f"clip-worker: error: {exc}", file=sys.stderr)
        return ExitCode.STARTUP
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
