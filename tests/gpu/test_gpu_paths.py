"""The GPU code paths, on a CUDA machine only (``make gpu-test``; ``.ci/gpu-bench`` runs them first).

They are not part of ``make test``: the development and CI machines have no GPU, and a skipped test is not
a passed one. Each test prints a FIGURES line that BENCHMARKS.md quotes.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from worker.device_resize import preprocess_on_device
from worker.embedder import Embedder, ModelSpec, load_embedder
from worker.gpu import GpuCollector
from worker.images import ImageLimits, Preprocessing, decode_and_preprocess, load_rgb
from worker.samples import jpeg_corpus, sample_images

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
    from worker.device_decode import DeviceJpegDecoder, decoded_only
    from worker.errors import RejectedRecord
    from worker.images import EncodedJpeg, prepare

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


def test_nvml_reports_memory_and_utilisation():
    families = {family.name: family for family in GpuCollector().collect()}
    total = families["clip_worker_gpu_memory_total_bytes"].samples
    assert total and total[0].value > 0
    assert "clip_worker_gpu_utilization_ratio" in families
