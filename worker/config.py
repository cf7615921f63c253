"""One frozen settings object: every option is a CLI flag and a ``CLIP_WORKER_*`` environment variable.

``--batch-size`` and ``CLIP_WORKER_BATCH_SIZE`` set the same field; a flag wins over the environment.
Secrets are :class:`pydantic.SecretStr` and never appear in logs or ``repr``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.errors import StartupError
from worker.fetching.uri import SCHEMES, redact

ENV_PREFIX = "CLIP_WORKER_"
DEFAULT_MODEL = "openai/clip-vit-large-patch14"
# The score heads --score runs (worker.models.heads has one per name) and where the aesthetic head's weights
# are published on the hub (LAION's NSFW detector is published outside the hub: see --nsfw-head).
ScoreName = Literal["aesthetic", "nsfw"]
SCORE_NAMES: tuple[str, ...] = get_args(ScoreName)
AESTHETIC_HEAD = "ttj/sac-logos-ava1-l14-linearMSE"
NSFW_WEIGHTS_URL = (
    "https://github.com/LAION-AI/CLIP-based-NSFW-Detector/files/10250461/clip_autokeras_binary_nsfw.zip"
)
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
# Kafka's own rule for topic names.
_TOPIC_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
# A secret may also come from a file (a mounted Kubernetes secret, say), so it never shows in `ps`.
# The longest text a request record may carry (messages.MAX_TEXT_LENGTH, which sits above this module): serve
# takes no longer texts than the stream does.
MAX_TEXT_CHARS = 16384
_SECRET_FILES = {"sasl_password_file": "sasl_password", "ssl_password_file": "ssl_password"}


class Settings(BaseSettings):
    """Every knob of the worker. Field names map to ``--field-name`` and ``CLIP_WORKER_FIELD_NAME``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    # Kafka topology
    bootstrap_servers: str = Field("localhost:9092", description="Kafka bootstrap servers, comma separated")
    input_topic: str = Field("images", description="topic of image request records")
    output_topic: str = Field("image-embeddings", description="topic the embeddings are published to")
    dlq_topic: str = Field("images.dlq", description="dead-letter topic for records that cannot be embedded")
    group_id: str = Field("clip-worker", description="consumer group; more workers in it share partitions")
    group_instance_id: str | None = Field(None, description="static group membership id (optional)")
    client_id: str = Field("clip-worker", description="Kafka client id")
    kafka_client: Literal["kafka-python", "librdkafka"] = Field(
        "kafka-python",
        description="Kafka client library: kafka-python (pure Python) or librdkafka (confluent-kafka: "
        "parsing, batching and I/O in C, off the GIL; pip install 'clip-worker[librdkafka]')",
    )
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="where a new group starts reading"
    )
    max_poll_interval_ms: int = Field(
        300_000, ge=1000, description="longest gap between polls before the group evicts this worker"
    )
    session_timeout_ms: int = Field(
        45_000, ge=1000, description="heartbeat timeout after which the group evicts a silent worker"
    )
    metadata_max_age_ms: int = Field(
        30_000,
        ge=1000,
        description="refresh topic metadata at least this often (new partitions, late topics)",
    )
    max_message_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="largest record fetched or produced, in bytes"
    )

    # Kafka security
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol"
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism when the protocol is SASL_*"
    )
    sasl_username: str | None = Field(None, description="SASL username")
    sasl_password: SecretStr | None = Field(
        None, description="SASL password (never logged; prefer the environment or --sasl-password-file)"
    )
    sasl_password_file: Path | None = Field(
        None, description="file holding the SASL password (trailing newline ignored)"
    )
    ssl_cafile: Path | None = Field(None, description="CA bundle that signs the broker certificate")
    ssl_certfile: Path | None = Field(None, description="client certificate for mutual TLS")
    ssl_keyfile: Path | None = Field(None, description="client private key for mutual TLS")
    ssl_password: SecretStr | None = Field(None, description="password of the client key (never logged)")
    ssl_password_file: Path | None = Field(None, description="file holding the client key's password")

    # Batching and flow control
    batch_size: int = Field(
        0,
        ge=0,
        le=65536,
        description="images per inference batch; 0 = sized from free GPU memory (32 on CPU)",
    )
    batch_timeout_ms: int = Field(
        100, ge=0, description="longest time the oldest image of a partial batch waits before it is embedded"
    )
    max_in_flight: int = Field(
        2048, ge=1, description="records polled but not yet acknowledged; polling pauses above it"
    )
    decode_workers: int = Field(0, ge=0, description="image decode threads; 0 = one per CPU core, at most 8")
    inference_threads: int = Field(
        0,
        ge=0,
        description="torch CPU threads; 0 = all cores for a large model on CPU, else what decoders leave",
    )
    commit_interval_ms: int = Field(
        1000,
        ge=0,
        description="how often acknowledged offsets are committed (with --exactly-once: each transaction)",
    )
    exactly_once: bool = Field(
        False,
        description="publish outputs and consumed offsets in Kafka transactions; read them read_committed",
    )
    transactional_id: str | None = Field(
        None,
        description="with --exactly-once: this worker's transactional id, stable across its restarts and "
        "unique in the fleet (default: from --group-instance-id, else host name and process id)",
    )

    # Image guards
    max_image_pixels: int = Field(
        64_000_000, ge=1, description="images with more pixels are rejected as image_too_large"
    )
    min_image_side: int = Field(3, ge=1, description="images with a side shorter than this are rejected")
    jpeg_draft: bool = Field(
        False,
        description="decode large JPEGs at 1/2-1/8 scale in the DCT domain (faster; docs/performance.md)",
    )
    resize: Literal["pil", "torch", "device"] = Field(
        "torch",
        description="bicubic resize: torch = PIL's filter as uint8 kernels (embedding cosine 0.9999998 to "
        "the reference); pil = the reference processor's own, bit for bit; device = resize, crop and "
        "normalise on the model's device (GPU), decode threads only decode",
    )
    decode: Literal["pil", "device"] = Field(
        "pil",
        description="JPEG decoding: pil = on the decode threads; device = on the model's device (nvJPEG via "
        "torchvision on a GPU; needs --resize device), other formats stay on the decode threads",
    )

    # Images by reference
    fetch_schemes: str | None = Field(
        None,
        description="URI schemes a request's uri may use, comma separated (http, https, s3, file); "
        "unset = http,https,s3, plus file when --fetch-file-root is given (serve: https only)",
    )
    fetch_concurrency: int = Field(
        128,
        ge=1,
        le=4096,
        description="images fetched at once by reference (connections; at most twice as many fetched images "
        "held): about images/s times the fetch latency",
    )
    fetch_timeout_s: float = Field(
        10.0, gt=0, description="time allowed for one try of one fetch, body included"
    )
    fetch_retries: int = Field(
        2,
        ge=0,
        le=10,
        description="further tries after a timeout, 5xx, 429 or dropped connection (with backoff)",
    )
    fetch_allow_hosts: str = Field(
        "",
        description="host names and IP ranges (CIDR), comma separated, that references may reach even if "
        "private, loopback or link-local (the metadata services only if named)",
    )
    fetch_allow_private: bool = Field(
        False,
        description="let references reach private, loopback and link-local addresses (not the metadata "
        "services)",
    )
    fetch_file_root: Path | None = Field(
        None, description="directory that file:// references must lie under (enables the file scheme)"
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint for s3:// references (default: AWS, or AWS_ENDPOINT_URL_S3)"
    )
    s3_region: str | None = Field(
        None, description="region for s3:// references (default: AWS_REGION / AWS_DEFAULT_REGION / profile)"
    )

    # Model
    model: str = Field(
        DEFAULT_MODEL,
        description="hub id or local directory of a CLIP or SigLIP checkpoint (see Model families)",
    )
    model_dir: Path | None = Field(None, description="weights cache directory (default: the HF cache)")
    local_files_only: bool = Field(False, description="never reach the hub; use only cached or local weights")
    random_weights: bool = Field(
        False, description="random weights for the model's architecture (benchmarks, offline smoke runs)"
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N (auto = first GPU if any)")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto = bfloat16 on GPU, float32 on CPU"
    )
    compile: Literal["off", "inductor", "cuda-graphs"] = Field(
        "off",
        description="torch.compile the forward pass for the batch size (partial batches are padded): "
        "inductor = fused kernels; cuda-graphs = also replay it as one CUDA graph (GPU only)",
    )
    texts: bool = Field(
        False,
        description="also embed requests that carry a text, with the model's text tower (loaded only with "
        "this flag); without it they are dead-lettered as input_kind_disabled",
    )
    forward_image: bool = Field(False, description="include the original image bytes in each output record")
    output_dtype: Literal["float32", "float16"] = Field(
        "float32",
        description="element type of the published embedding (the record's dtype says which); float16 "
        "halves the output topic",
    )

    # Scores from the same pass
    score: tuple[ScoreName, ...] = Field(
        (),
        description="score heads run on each embedding in the same pass, repeatable or comma separated: "
        "aesthetic (LAION aesthetic predictor, about 1-10), nsfw (LAION NSFW detector, 0-1); each adds "
        "scores.<name> to the output record (CLIP ViT-L/14 embeddings only)",
    )
    aesthetic_head: str = Field(
        AESTHETIC_HEAD, description="hub id, weight file or directory of the aesthetic head's weights"
    )
    nsfw_head: str | None = Field(
        None,
        description="weight file or directory (or hub id) of the NSFW head: the PyTorch port "
        "clip_autokeras_binary_nsfw.pth, or the zip holding it, that LAION publishes on GitHub",
    )
    route_nsfw_above: float | None = Field(
        None,
        ge=0,
        le=1,
        description="send outputs whose nsfw score is above this to --nsfw-topic instead of --output-topic "
        "(needs --score nsfw)",
    )
    nsfw_topic: str | None = Field(
        None, description="topic of the outputs --route-nsfw-above routes (default: <output-topic>.nsfw)"
    )

    # clip-worker serve: the embeddings API
    serve_host: str = Field("0.0.0.0", description="serve: address the embeddings API binds")
    serve_port: int = Field(8000, ge=0, le=65535, description="serve: port of the embeddings API")
    served_model_name: str | None = Field(
        None,
        description="serve: the model name requests give and /v1/models lists (default: --model; the "
        "label of a --random-weights model is accepted too)",
    )
    serve_max_queue: int = Field(
        1024,
        ge=1,
        description="serve: inputs admitted and not yet answered, all requests together; a request that "
        "would go past it is answered 429 with Retry-After",
    )
    serve_max_inputs: int = Field(
        256, ge=1, description="serve: inputs (texts or images) one request may carry; more is a 400"
    )
    serve_max_text_chars: int = Field(
        MAX_TEXT_CHARS,
        ge=1,
        le=MAX_TEXT_CHARS,
        description="serve: characters one text may have; longer is a 400 (the tokenizer truncates to the "
        "model's context, as the worker does)",
    )
    serve_max_request_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="serve: largest request body; larger is a 413"
    )
    serve_max_queued_image_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="serve: bytes of the images sent inline admitted and not yet answered, all requests "
        "together (at least --serve-max-request-bytes); a request that would go past it is answered 429 "
        "with Retry-After",
    )
    serve_retry_after_s: int = Field(
        1, ge=1, description="serve: the Retry-After seconds of a 429 (queue full)"
    )

    # Operations
    metrics_port: int = Field(9400, ge=0, le=65535, description="Prometheus and health port; 0 disables")
    metrics_host: str = Field("0.0.0.0", description="address the metrics server binds")
    shutdown_grace_s: float = Field(30.0, gt=0, description="time allowed to drain on SIGTERM/SIGINT")
    connect_timeout_s: float = Field(
        60.0, gt=0, description="give up and exit non-zero if no broker answers within this time"
    )
    progress_interval_s: float = Field(
        30.0, ge=0, description="seconds between progress log lines (images/s, lag, GPU); 0 disables"
    )
    broker_lost_timeout_s: float = Field(
        300.0,
        gt=0,
        description="exit non-zero when work is pending and the broker has not answered for this long",
    )
    stall_timeout_s: float = Field(
        300.0,
        gt=0,
        description="/healthz fails when records are in flight and none was acknowledged for this long",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_format: Literal["text", "json"] = Field("text", description="log line format")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE_PATTERN.match(value):
            raise ValueError("use auto, cpu, cuda or cuda:N")
        return value

    @field_validator("input_topic", "output_topic", "dlq_topic", "nsfw_topic")
    @classmethod
    def _check_topic(cls, value: str | None) -> str | None:
        if value is not None and not _is_topic_name(value):
            raise ValueError("a topic name is 1-249 characters of letters, digits, '.', '_' and '-'")
        return value

    @field_validator("score", mode="before")
    @classmethod
    def _split_scores(cls, value: Any) -> Any:
        # A comma list (the environment variable, or one flag) or several flags: one tuple without repeats.
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            return value
        names = [name.strip() for item in value for name in str(item).split(",") if name.strip()]
        unknown = [name for name in names if name not in SCORE_NAMES]
        if unknown:
            raise ValueError(f"unknown score {unknown[0]!r}; choose from {', '.join(SCORE_NAMES)}")
        return tuple(dict.fromkeys(names))

    @field_validator("group_id", "client_id")
    @classmethod
    def _check_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("group_instance_id", "transactional_id")
    @classmethod
    def _check_blank_optional(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty (leave it unset instead)")
        return value

    @field_validator("fetch_schemes")
    @classmethod
    def _check_schemes(cls, value: str | None) -> str | None:
        if value is None:
            return None
        schemes = [part.strip().lower() for part in value.split(",") if part.strip()]
        unknown = [scheme for scheme in schemes if scheme not in SCHEMES]
        if unknown:
            raise ValueError(f"unknown scheme {unknown[0]!r}; use some of {', '.join(SCHEMES)}")
        return ",".join(schemes)

    @field_validator("fetch_allow_hosts")
    @classmethod
    def _check_allow_hosts(cls, value: str) -> str:
        from worker.fetching.guard import parse_allow_entries

        parse_allow_entries(value.split(","))
        return value

    @field_validator("fetch_file_root")
    @classmethod
    def _check_file_root(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"no such directory: {value}")
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^https?://[^/@\s]+(/\S*)?$", value):
            raise ValueError("use an http:// or https:// URL without credentials (they come from AWS_*)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        for file_field, secret_field in _SECRET_FILES.items():
            path = values.get(file_field)
            if path is None:
                continue
            if values.get(secret_field) is not None:
                raise ValueError(
                    f"{flag_name(secret_field)} and {flag_name(file_field)} are both set; keep one of them"
                )
            try:
                values[secret_field] = Path(path).read_text().rstrip("\r\n")
            except OSError as exc:
                raise ValueError(
                    f"cannot read {flag_name(file_field)} {path}: {exc.strerror or exc}"
                ) from None
        return values

    @field_validator("ssl_cafile", "ssl_certfile", "ssl_keyfile")
    @classmethod
    def _check_file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @model_validator(mode="after")
    def _check_security(self) -> Settings:
        if self.security_protocol.startswith("SASL_"):
            if self.sasl_mechanism is None:
                raise ValueError("SASL protocols need --sasl-mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512)")
            if not self.sasl_username or self.sasl_password is None:
                raise ValueError("SASL needs --sasl-username and --sasl-password (or --sasl-password-file)")
        return self

    @model_validator(mode="after")
    def _check_transactions(self) -> Settings:
        if self.transactional_id is not None and not self.exactly_once:
            raise ValueError("--transactional-id only applies with --exactly-once; add it or drop the id")
        return self

    @model_validator(mode="after")
    def _check_decoding(self) -> Settings:
        if self.decode == "device" and self.resize != "device":
            raise ValueError("--decode device leaves pixels on the device: add --resize device")
        if self.decode == "device" and self.jpeg_draft:
            raise ValueError("--jpeg-draft applies to host decoding: drop it or use --decode pil")
        return self

    @model_validator(mode="after")
    def _check_file_scheme(self) -> Settings:
        if "file" in self.fetch_scheme_set and self.fetch_file_root is None:
            raise ValueError(
                "the file scheme needs --fetch-file-root (the directory file:// URIs must lie under)"
            )
        return self

    @model_validator(mode="after")
    def _check_serve_limits(self) -> Settings:
        if self.serve_max_inputs > self.serve_max_queue:
            raise ValueError(
                "--serve-max-inputs is above --serve-max-queue: no request that large could ever be "
                "admitted; raise the queue or lower the inputs"
            )
        if self.serve_max_queued_image_bytes < self.serve_max_request_bytes:
            raise ValueError(
                "--serve-max-queued-image-bytes is below --serve-max-request-bytes: a request that large "
                "could never be admitted; raise the budget or lower the request size"
            )
        return self

    @property
    def fetch_scheme_set(self) -> frozenset[str]:
        """The schemes a request's ``uri`` may use (the one place that decides the default)."""
        if self.fetch_schemes is not None:
            return frozenset(s for s in self.fetch_schemes.split(",") if s)
        defaults = {"http", "https", "s3"}
        return frozenset(defaults | ({"file"} if self.fetch_file_root is not None else set()))

    @property
    def fetch_allow_host_list(self) -> tuple[str, ...]:
        """``--fetch-allow-hosts`` as a list."""
        return tuple(part.strip() for part in self.fetch_allow_hosts.split(",") if part.strip())

    @model_validator(mode="after")
    def _check_scores(self) -> Settings:
        if self.route_nsfw_above is not None and "nsfw" not in self.score:
            raise ValueError("--route-nsfw-above routes by the nsfw score: add --score nsfw")
        if self.nsfw_topic is not None and self.route_nsfw_above is None:
            raise ValueError("--nsfw-topic only applies with --route-nsfw-above; add it or drop the topic")
        routed = self.nsfw_output_topic
        if routed is not None:
            if not _is_topic_name(routed):
                raise ValueError(f"the NSFW topic {routed!r} is not a valid topic name; set --nsfw-topic")
            if routed in (self.input_topic, self.output_topic, self.dlq_topic):
                raise ValueError(
                    f"the NSFW topic {routed!r} must differ from the input, output and DLQ topics"
                )
        return self

    @property
    def nsfw_output_topic(self) -> str | None:
        """Where ``--route-nsfw-above`` sends outputs (``--nsfw-topic``, else ``<output-topic>.nsfw``); None
        without routing."""
        if self.route_nsfw_above is None:
            return None
        return self.nsfw_topic or f"{self.output_topic}.nsfw"

    def output_topics(self) -> list[tuple[str, str]]:
        """Every topic the worker writes to, with the flag that names it."""
        topics = [("--output-topic", self.output_topic)]
        if self.nsfw_output_topic is not None:
            topics.append(("--nsfw-topic", self.nsfw_output_topic))
        return [*topics, ("--dlq-topic", self.dlq_topic)]

    @property
    def batch_timeout_s(self) -> float:
        """The batch timeout in seconds."""
        return self.batch_timeout_ms / 1000.0

    def redacted(self) -> dict[str, Any]:
        """The resolved configuration for logging: secrets are masked."""
        shown: dict[str, Any] = {}
        for name, value in self.model_dump().items():
            if isinstance(value, SecretStr):
                shown[name] = "**********"
            elif isinstance(value, Path):
                shown[name] = str(value)
            else:
                shown[name] = value
        return shown


def _is_topic_name(value: str) -> bool:
    return bool(_TOPIC_PATTERN.match(value)) and value not in (".", "..")


def flag_name(field: str) -> str:
    """The CLI flag of a settings field: ``batch_size`` -> ``--batch-size``."""
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    """The environment variable of a settings field: ``batch_size`` -> ``CLIP_WORKER_BATCH_SIZE``."""
    return ENV_PREFIX + field.upper()


def _check_unknown_env(environ: dict[str, str]) -> None:
    known = {env_name(name) for name in Settings.model_fields}
    for key in sorted(environ):
        if key.startswith(ENV_PREFIX) and key not in known:
            raise StartupError(
                f"unknown environment variable {key}; remove it or use one of the documented "
                f"{ENV_PREFIX}* names (see `clip-worker run --help`)"
            )


def load_settings(overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Build settings from flags (``overrides``) over ``CLIP_WORKER_*`` env vars over defaults.

    Raises :class:`StartupError` with a one-line message naming the flag and env var to fix.
    """
    env = dict(os.environ if environ is None else environ)
    _check_unknown_env(env)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        return _settings_from_mapping(given, env)
    except ValidationError as exc:
        raise StartupError(_describe_validation_error(exc)) from None


def _settings_from_mapping(given: dict[str, Any], env: dict[str, str]) -> Settings:
    # Validating a plain mapping keeps one precedence rule (flag > env > default) and lets tests pass an
    # environment without touching os.environ.
    merged: dict[str, Any] = {}
    for name in Settings.model_fields:
        if env_name(name) in env:
            merged[name] = env[env_name(name)]
    merged.update(given)
    return Settings.model_validate(merged)


def _describe_validation_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    location = [str(part) for part in error.get("loc", ())]
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if location and location[0] in Settings.model_fields:
        field = location[0]
        value = error.get("input")
        shown = "***" if "password" in field else repr(value)
        if field == "s3_endpoint_url" and isinstance(value, str):
            shown = repr(redact(value))
        return f"invalid {flag_name(field)} / {env_name(field)} = {shown}: {message}"
    return f"invalid configuration: {message}"


def markdown_table() -> str:
    """The table of docs/configuration.md, generated so it never drifts from the code (``make docs``)."""
    rows = ["| flag | environment variable | default | meaning |", "| --- | --- | --- | --- |"]
    for name, info in Settings.model_fields.items():
        default = "unset" if info.default in (None, ()) else info.default
        rows.append(f"| `{flag_name(name)}` | `{env_name(name)}` | `{default}` | {info.description} |")
    return "\n".join(rows) + "\n"
