"""Which input kinds this worker handles, and how: the one place that maps settings to handlers."""

from __future__ import annotations

from worker.config import Settings
from worker.errors import StartupError
from worker.fetching.fetcher import Fetcher, FetchPolicy
from worker.imaging.host import ImageLimits, Preprocessing
from worker.intake.inputs.base import InputHandler
from worker.intake.inputs.image_bytes import ImageDecoder
from worker.intake.inputs.image_uri import ImageFetcher
from worker.intake.inputs.text import TextTokenizer
from worker.messages import InputKind
from worker.models.text import TextTower
from worker.ops.metrics import WorkerMetrics

# What a request of a kind this worker does not handle is told (the dead letter's error message).
ENABLE_HINTS: dict[InputKind, str] = {
    InputKind.IMAGE: "this worker takes no inline images",
    InputKind.URI: "this worker does not fetch images by reference (--fetch-schemes is empty)",
    InputKind.TEXT: "this worker does not embed texts; start it with --texts (CLIP_WORKER_TEXTS=true)",
}


def build_handlers(
    settings: Settings,
    limits: ImageLimits,
    preprocessing: Preprocessing,
    decode_workers: int,
    metrics: WorkerMetrics,
    text: TextTower | None = None,
) -> dict[InputKind, InputHandler]:
    """The handler of each input kind the settings enable (texts: ``text``, the loaded text tower)."""
    decoder = ImageDecoder(limits, preprocessing, decode_workers, metrics)
    handlers: dict[InputKind, InputHandler] = {InputKind.IMAGE: decoder}
    if settings.texts:
        if text is None:
            raise StartupError("--texts needs the model's text tower, which was not loaded")
        handlers[InputKind.TEXT] = TextTokenizer(text, metrics)
    policy = fetch_policy(settings, limits)
    if policy.schemes:
        fetcher = Fetcher(policy, metrics)
        handlers[InputKind.URI] = ImageFetcher(fetcher, decoder, policy.concurrency, settings.forward_image)
    return handlers


def fetch_policy(settings: Settings, limits: ImageLimits) -> FetchPolicy:
    """What references may be fetched and how, from the ``--fetch-*`` and ``--s3-*`` settings; the byte
    limit is the inline images' own (``limits.max_bytes``)."""
    return FetchPolicy(
        schemes=settings.fetch_scheme_set,
        max_bytes=limits.max_bytes,
        timeout_s=settings.fetch_timeout_s,
        retries=settings.fetch_retries,
        concurrency=settings.fetch_concurrency,
        allow_hosts=settings.fetch_allow_host_list,
        allow_private=settings.fetch_allow_private,
        file_root=settings.fetch_file_root,
        s3_endpoint_url=settings.s3_endpoint_url,
        s3_region=settings.s3_region,
    )
