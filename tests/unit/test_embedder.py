import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.tiny_clip import TINY_DIM, TINY_IMAGE_SIZE
from worker.devtools.samples import sample_images
from worker.errors import ModelLoadError, StartupError
from worker.imaging.host import ImageLimits, decode_and_preprocess
from worker.inference.embedder import ModelSpec, load_embedder, resolve_device, resolve_dtype


@pytest.fixture(scope="module")
def pixels(tiny_embedder):
    samples = sample_images(6)
    return np.stack(
        [decode_and_preprocess(s.data, ImageLimits(), tiny_embedder.preprocessing) for s in samples]
    )


def test_loads_vision_tower_and_preprocessing_from_a_full_clip_checkpoint(tiny_embedder, tiny_clip_dir):
    assert tiny_embedder.dim == TINY_DIM
    assert tiny_embedder.preprocessing.crop == TINY_IMAGE_SIZE
    assert tiny_embedder.label == str(tiny_clip_dir)
    assert not tiny_embedder.is_random


def test_embeddings_have_model_dim_and_unit_norm(tiny_embedder, pixels):
    vectors = tiny_embedder.embed(pixels)
    assert vectors.shape == (len(pixels), TINY_DIM)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_embeddings_are_deterministic_and_batch_size_independent(tiny_embedder, pixels):
    batched = tiny_embedder.embed(pixels)
    again = tiny_embedder.embed(pixels)
    one_by_one = np.concatenate([tiny_embedder.embed(pixels[i : i + 1]) for i in range(len(pixels))])
    np.testing.assert_array_equal(batched, again)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    assert not np.allclose(batched[0], batched[1]), "different pictures must embed differently"


def test_embedding_equals_clip_get_image_features(tiny_embedder, tiny_clip_dir, pixels):
    from transformers import CLIPModel

    full = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    with torch.inference_mode():
        output = full.get_image_features(pixel_values=torch.from_numpy(pixels))
    features = output if isinstance(output, torch.Tensor) else output.pooler_output
    expected = torch.nn.functional.normalize(features.float(), dim=-1).numpy()
    np.testing.assert_allclose(tiny_embedder.embed(pixels), expected, atol=1e-5)


def test_random_weights_follow_the_checkpoint_architecture_and_say_so(tiny_clip_dir):
    embedder = load_embedder(ModelSpec(model=str(tiny_clip_dir), random_weights=True, device="cpu"))
    assert embedder.is_random
    assert embedder.label == f"random:{tiny_clip_dir}"
    assert embedder.dim == TINY_DIM


def test_missing_directory_names_the_flags_to_fix(tmp_path):
    with pytest.raises(ModelLoadError) as caught:
        load_embedder(ModelSpec(model=str(tmp_path / "nope"), device="cpu"))
    message = str(caught.value)
    assert "--model" in message and "--model-dir" in message and "--random-weights" in message
    assert "\n" not in message


def test_directory_without_weights_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ModelLoadError, match="--random-weights"):
        load_embedder(ModelSpec(model=str(tmp_path), device="cpu"))


def test_unreachable_hub_model_offline_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="--model-dir"):
        load_embedder(
            ModelSpec(
                model="openai/clip-vit-large-patch14", model_dir=tmp_path, local_files_only=True, device="cpu"
            )
        )


def test_device_and_dtype_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(StartupError, match="--device cpu"):
            resolve_device("cuda:0")


def test_compiled_forward_pass_matches_eager_for_full_partial_and_larger_batches(tiny_embedder, pixels):
    eager = tiny_embedder.embed(pixels)
    compiled = tiny_embedder.view()
    compiled.compile("inductor", batch_size=4)  # inductor on the CPU: the same graph capture as on a GPU
    full = compiled.embed(pixels[:4])
    partial = compiled.embed(pixels[:3])  # padded to 4 inside, only 3 rows come back
    larger = compiled.embed(pixels)  # over the compiled size: eager
    np.testing.assert_allclose(full, eager[:4], atol=1e-5)
    np.testing.assert_allclose(partial, eager[:3], atol=1e-5)
    np.testing.assert_allclose(larger, eager, atol=1e-6)
    assert partial.shape == (3, TINY_DIM)


def test_cuda_graphs_need_a_gpu(tiny_embedder):
    with pytest.raises(StartupError, match="--compile cuda-graphs needs a GPU"):
        tiny_embedder.view().compile("cuda-graphs", batch_size=4)


def test_graphs_inductor_skips_are_reported_loudly(tiny_embedder, pixels, monkeypatch, caplog):
    # On the CPU inductor always refuses CUDA graphs, which makes the skip observable here; on a GPU it
    # refuses them for CPU ops or mutated inputs in the graph, and the worker must not stay silent about it.
    import worker.inference.embedder as embedder_module

    monkeypatch.setitem(embedder_module.COMPILE_OPTIONS, "inductor", {"triton.cudagraphs": True})
    compiled = tiny_embedder.view()
    with caplog.at_level("ERROR", logger="worker.inference.embedder"):
        compiled.compile("inductor", batch_size=4)
    assert compiled.graphs_skipped
    assert "CUDA GRAPHS SKIPPED" in caplog.text
    np.testing.assert_allclose(compiled.embed(pixels[:4]), tiny_embedder.embed(pixels[:4]), atol=1e-5)


def test_compiling_again_for_the_same_size_reuses_the_graph(tiny_embedder):
    compiled = tiny_embedder.view()
    compiled.compile("inductor", batch_size=4)
    assert compiled.compile("inductor", batch_size=4) == 0.0


def test_a_compiled_forward_pass_is_warmed_up_again_on_the_thread_that_runs_it(tiny_embedder, pixels, caplog):
    # Inductor keeps compiled CUDA graphs per thread: the inference thread must warm its own up before it
    # embeds real images, whichever thread compiled.
    import threading

    compiled = tiny_embedder.view()
    compiled.compile("inductor", batch_size=4)
    results: list[np.ndarray] = []
    with caplog.at_level("INFO", logger="worker.inference.embedder"):
        thread = threading.Thread(target=lambda: results.append(compiled.embed(pixels[:4])), name="inference")
        thread.start()
        thread.join(timeout=120)
    assert "warmed up the compiled forward pass on thread inference" in caplog.text
    np.testing.assert_allclose(results[0], tiny_embedder.embed(pixels[:4]), atol=1e-5)
