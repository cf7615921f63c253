"""The GPU code paths, on a CUDA machine only (``make gpu-test``; ``.ci/gpu-bench`` runs them first).

They are not part of ``make test``: the development and CI machines have no GPU, and a skipped test is not
a passed one. Each test prints a FIGURES line that docs/gpu.md and docs/performance.md quote.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from worker.devtools.samples import jpeg_corpus, sample_images
from worker.imaging.device_preprocess import preprocess_on_device
from worker.imaging.host import ImageLimits, Preprocessing, decode_and_preprocess, load_rgb
from worker.inference.embedder import Embedder, ModelSpec, load_embedder
from worker.ops.gpu import GpuCollector

if not torch.cuda.is_available():
    pytest.skip("the GPU tests need CUDA", allow_module_level=True)

pytestmark = pytest.mark.gpu
IMAGES = [s.data for s in sample_images(16, seed=21)] + jpeg_corpus(8, 640, 480, 22)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1)))


@pytest.fixture(scope="module")
def cuda_embedder(tiny_clip_dir) -> Embedder:
    return load_embedder(ModelSpec(model=str(tiny_clip_dir), device="cuda"))


@pytest.fixture(scope="module")
def pixels(cuda_embedder) -> np.ndarray:
    params = cuda_embedder.preprocessing
    return np.stack([decode_and_preprocess(d, ImageLimits(), params) for d in IMAGES])


def test_bfloat16_via_the_pinned_buffer_embeds_like_float32_on_cpu(cuda_embedder, tiny_embedder, pixels):
    assert cuda_embedder.dtype == torch.bfloat16
    on_gpu = np.concatenate([cuda_embedder.embed(pixels[:10]), cuda_embedder.embed(pixels[10:])])
    similarity = cosine(on_gpu, tiny_embedder.embed(pixels))
    print(f"FIGURES gpu bf16 vs cpu fp32: min cosine {similarity:.6f}")
    assert similarity >= 0.99


def test_batch_size_from_free_memory(cuda_embedder):
    size = cuda_embedder.auto_batch_size()
    print(f"FIGURES auto batch size (tiny model): {size}")
    assert 8 <= size <= 512 and size % 8 == 0


def test_cuda_graphs_match_eager_for_full_and_partial_batches(cuda_embedder, pixels):
    eager = cuda_embedder.embed(pixels[:8])
    graphed = cuda_embedder.view()
    seconds = graphed.compile("cuda-graphs", batch_size=8)
    full = graphed.embed(pixels[:8])
    partial = graphed.embed(pixels[:5])
    print(f"FIGURES cuda-graphs compile {seconds:.1f}s, min cosine to eager {cosine(full, eager):.6f}")
    assert cosine(full, eager) >= 0.999
    assert cosine(partial, eager[:5]) >= 0.999 and partial.shape[0] == 5


def test_device_resize_on_cuda_matches_the_reference():
    from transformers import CLIPImageProcessorPil

    reference = CLIPImageProcessorPil()
    params = Preprocessing(resize="device")
    decoded = [decode_and_preprocess(d, ImageLimits(), params) for d in IMAGES]
    ours = preprocess_on_device(decoded, params, torch.device("cuda")).cpu().numpy()
    theirs = np.stack(
        [reference(images=load_rgb(d, ImageLimits()), return_tensors="np")["pixel_values"][0] for d in IMAGES]
    )
    difference = float(np.abs(ours - theirs).max())
    print(f"FIGURES device resize on CUDA: max abs diff {difference:.4f}")
    assert difference <= 0.05


def test_device_resize_embeds_like_the_host_resize(cuda_embedder):
    params = cuda_embedder.preprocessing
    on_device = cuda_embedder.embed_decoded(
        [decode_and_preprocess(d, ImageLimits(), replace(params, resize="device")) for d in IMAGES]
    )
    on_host = cuda_embedder.embed(
        np.stack([decode_and_preprocess(d, ImageLimits(), replace(params, resize="torch")) for d in IMAGES])
    )
    assert cosine(on_device, on_host) >= 0.999


def test_nvjpeg_decoding_matches_the_host_decoder_and_embeds_like_it(cuda_embedder):
    from worker.errors import RejectedRecord
    from worker.imaging.device_decode import DeviceJpegDecoder, decoded_only
    from worker.imaging.host import EncodedJpeg, prepare

    params = replace(cuda_embedder.preprocessing, resize="device", decode="device")
    prepared = [prepare(d, ImageLimits(), params) for d in IMAGES]
    decoder = DeviceJpegDecoder(torch.device("cuda"), ImageLimits())
    with cuda_embedder.on_own_stream():
        decoded = decoder.materialise(prepared)
    pixel_levels = 0
    for data, before, after in zip(IMAGES, prepared, decoded, strict=True):
        assert not isinstance(after, RejectedRecord)
        if isinstance(before, EncodedJpeg):
            assert isinstance(after, torch.Tensor) and after.is_cuda
            host = torch.from_numpy(np.asarray(load_rgb(data, ImageLimits()))).permute(2, 0, 1)
            pixel_levels = max(pixel_levels, int((after.cpu().int() - host.int()).abs().max()))
    on_device = cuda_embedder.embed_decoded(decoded_only(decoded))
    on_host = cuda_embedder.embed(
        np.stack(
            [
                decode_and_preprocess(d, ImageLimits(), replace(params, resize="pil", decode="pil"))
                for d in IMAGES
            ]
        )
    )
    jpegs = sum(isinstance(p, EncodedJpeg) for p in prepared)
    print(
        f"FIGURES nvJPEG: {jpegs} of {len(IMAGES)} images decoded on the GPU, {decoder.fallbacks} refused; "
        f"max pixel difference to libjpeg {pixel_levels} levels; min cosine to the reference "
        f"{cosine(on_device, on_host):.6f}"
    )
    assert jpegs >= 8 and decoder.fallbacks == 0
    assert cosine(on_device, on_host) >= 0.999


def test_batches_launched_back_to_back_read_back_their_own_vectors(cuda_embedder, pixels):
    # The inference stage launches batch N+1 before it awaits batch N: the pinned input buffer and the
    # asynchronous readback must not mix batches up.
    batches = [pixels[start : start + 4] for start in range(0, len(pixels), 4)]
    one_at_a_time = [cuda_embedder.embed(batch) for batch in batches]
    pending = [cuda_embedder.launch(list(batch)) for batch in batches]  # lists, as the inference stage
    overlapped = [handle.result() for handle in pending]
    worst = min(cosine(a, b) for a, b in zip(overlapped, one_at_a_time, strict=True))
    print(f"FIGURES {len(batches)} batches launched back to back: min cosine to one at a time {worst:.6f}")
    assert worst >= 0.9999


def _queue_busy_work(cycles: int = 50_000_000) -> None:
    # About 25 ms of a spinning kernel on the current stream, so the work queued behind it is still pending
    # when the host moves on to the next batch.
    torch.cuda._sleep(cycles)  # type: ignore[no-untyped-call]


def test_nvjpeg_batches_decoded_while_the_previous_batch_is_in_flight_embed_like_the_host_path(cuda_embedder):
    # pytorch/vision#9606: nvJPEG could write into blocks that the previous batch's queued kernels still read.
    # The inference stage decodes batch N+1 while batch N is queued; twelve batches of changing sizes make the
    # allocator recycle blocks between them, and busy work in front of each batch keeps them queued.
    from worker.imaging.device_decode import DeviceJpegDecoder, decoded_only
    from worker.imaging.host import prepare

    params = replace(cuda_embedder.preprocessing, resize="device", decode="device")
    limits = ImageLimits()
    batches = [jpeg_corpus(6, 480 + 32 * (i % 4), 360 + 24 * (i % 3), 200 + 10 * i) for i in range(12)]
    decoder = DeviceJpegDecoder(torch.device("cuda"), limits)

    def launch(batch: list[bytes]):
        with cuda_embedder.on_own_stream():
            _queue_busy_work()
            decoded = decoder.materialise([prepare(d, limits, params) for d in batch])
        return cuda_embedder.launch_decoded(decoded_only(decoded))

    overlapped: list[np.ndarray] = []
    pending = None
    for batch in batches:  # as the inference stage: launch the next batch, then finish the previous one
        launched = launch(batch)
        if pending is not None:
            overlapped.append(pending.result())
        pending = launched
    assert pending is not None
    overlapped.append(pending.result())
    serial = []
    for batch in batches:
        torch.cuda.synchronize()
        serial.append(launch(batch).result())
    host_params = replace(params, decode="pil")
    on_host = [
        cuda_embedder.embed_decoded([decode_and_preprocess(d, limits, host_params) for d in batch])
        for batch in batches
    ]
    to_serial = min(cosine(a, b) for a, b in zip(overlapped, serial, strict=True))
    to_host = min(cosine(a, b) for a, b in zip(overlapped, on_host, strict=True))
    print(
        f"FIGURES nvJPEG, {len(batches)} batches decoded while the previous one was in flight: min cosine "
        f"{to_serial:.6f} to the same batches one at a time, {to_host:.6f} to the host decoder"
    )
    assert decoder.fallbacks == 0
    assert to_serial >= 0.9999  # below: a race (the decode wrote memory a queued batch still used)
    assert to_host >= 0.9999  # below with the first passing: nvJPEG's own pixels differ from libjpeg's


def test_cuda_graphs_compiled_on_one_thread_run_right_on_the_inference_thread(cuda_embedder, pixels):
    # The worker compiles on its main thread and embeds on the inference thread; inductor keeps compiled
    # CUDA graphs per thread, so the inference thread records its own on its first batch.
    import threading

    eager = cuda_embedder.embed(pixels[:8])
    graphed = cuda_embedder.view()
    errors: list[BaseException] = []

    def in_thread(name: str, work) -> None:
        def run() -> None:
            try:
                work()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run, name=name)
        thread.start()
        thread.join(timeout=300)
        assert not thread.is_alive(), f"the {name} thread hung"
        assert not errors, errors

    in_thread("compiler", lambda: graphed.compile("cuda-graphs", 8))
    assert not graphed.graphs_skipped, "inductor skipped the CUDA graphs (see the log)"
    results: list[np.ndarray] = []

    def infer() -> None:
        for _ in range(3):  # replays after the first batch's recording
            pending = [graphed.launch(pixels[:8]), graphed.launch(pixels[2:7])]
            results.extend(handle.result() for handle in pending)

    in_thread("inference", infer)
    worst_full = min(cosine(r, eager) for r in results[0::2])
    worst_partial = min(cosine(r, eager[2:7]) for r in results[1::2])
    main_thread = graphed.embed(pixels[:8])  # and the main thread still gets its own graph right
    print(
        f"FIGURES cuda-graphs on the inference thread: min cosine to eager {worst_full:.6f} (full batches), "
        f"{worst_partial:.6f} (partial); main thread afterwards {cosine(main_thread, eager):.6f}"
    )
    assert worst_full >= 0.999 and worst_partial >= 0.999
    assert cosine(main_thread, eager) >= 0.999


def test_device_resize_queues_without_waiting_for_the_device(cuda_embedder):
    # --resize device must not make the host wait for the device (no synchronising copies), or the inference
    # thread cannot queue the next batch while the device works on this one.
    params = replace(cuda_embedder.preprocessing, resize="device")
    decoded = [decode_and_preprocess(d, ImageLimits(), params) for d in IMAGES]  # twelve formats, mixed sizes
    device = torch.device("cuda")
    with cuda_embedder.on_own_stream():
        expected = preprocess_on_device(decoded, params, device).cpu()  # the first batch makes constants
        torch.cuda.set_sync_debug_mode("error")
        try:
            queued = preprocess_on_device(decoded, params, device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(queued.cpu(), expected)


def test_nvml_reports_memory_and_utilisation():
    families = {family.name: family for family in GpuCollector().collect()}
    total = families["clip_worker_gpu_memory_total_bytes"].samples
    assert total and total[0].value > 0
    assert "clip_worker_gpu_utilization_ratio" in families


def test_texts_on_cuda_interleaved_with_cuda_graph_image_batches(tiny_clip_dir, pixels):
    # --texts with --compile cuda-graphs: the text tower runs eagerly on the embedder's stream between
    # replays of the vision graph; neither disturbs the other.
    texts = ["a photo of a dog", "a cat", "two dogs playing in the snow", "x"]
    on_cpu = load_embedder(ModelSpec(model=str(tiny_clip_dir), device="cpu"), texts=True)
    on_gpu = load_embedder(ModelSpec(model=str(tiny_clip_dir), device="cuda"), texts=True)
    eager_images = on_gpu.embed(pixels[:8])
    on_gpu.compile("cuda-graphs", batch_size=8)
    assert on_gpu.text is not None
    tokens = on_gpu.text.tokenize(texts)
    pending = [on_gpu.launch(pixels[:8]), on_gpu.launch_texts(tokens), on_gpu.launch(pixels[:8])]
    images_before, text_vectors, images_after = (handle.result() for handle in pending)
    text_cosine = cosine(text_vectors, on_cpu.embed_texts(texts))
    image_cosine = min(cosine(images_before, eager_images), cosine(images_after, eager_images))
    print(f"FIGURES texts on cuda bf16 vs cpu fp32: min cosine {text_cosine:.6f}; images {image_cosine:.6f}")
    assert text_cosine >= 0.99 and image_cosine >= 0.999


def test_scores_read_back_with_their_own_batch_when_batches_are_in_flight(
    tiny_clip_768_embedder, tmp_path, pixels
):
    from tests.support.score_heads import REFERENCES, load_state, save_random_heads
    from worker.config import load_settings
    from worker.inference.scores import load_score_heads

    embedder = load_embedder(ModelSpec(model=tiny_clip_768_embedder.label, device="cuda"))
    locations = save_random_heads(tmp_path)
    asked = {"score": "aesthetic,nsfw", "aesthetic_head": str(locations["aesthetic"])}
    heads = load_score_heads(
        load_settings({**asked, "nsfw_head": str(locations["nsfw"])}, environ={}), embedder
    )
    assert heads is not None
    first, second = embedder.launch(pixels[:12], heads), embedder.launch(pixels[12:], heads)
    vectors = np.concatenate([first.result(), second.result()])
    scores = np.concatenate([first.scores(), second.scores()])
    worst = 0.0
    for column, name in enumerate(heads.names):
        expected = REFERENCES[name](load_state(locations[name]), vectors)
        worst = max(worst, float(np.abs(scores[:, column] - expected).max()))
    print(f"FIGURES scores on cuda vs numpy reference on the read-back vectors: max abs diff {worst:.2e}")
    assert worst < 1e-4
