"""``--resize device`` queues its work without making the host wait for the device.

On a GPU every tensor made from Python or NumPy data (``aten.lift_fresh``) is a copy from pageable memory,
which waits until the device has drained its queue, and indexing with a Python list is one such copy. The
CPU shows the same operations, so the test watches them here; ``tests/gpu`` checks the same on CUDA with
torch's sync debug mode.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from worker.imaging.device_preprocess import preprocess_on_device
from worker.imaging.host import Preprocessing

PARAMS = Preprocessing(resize="device")
CPU = torch.device("cpu")


class _Ops(TorchDispatchMode):  # type: ignore[no-untyped-call]
    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.names: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    shapes = [(300, 400), (250, 260), (300, 400), (224, 224), (250, 260)]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def test_a_batch_of_mixed_sizes_makes_no_tensor_from_host_data_and_scatters_nothing():
    images = _images()
    preprocess_on_device(images, PARAMS, CPU)  # the first batch may make the constants
    with _Ops() as ops:
        preprocess_on_device(images, PARAMS, CPU)
    assert "aten.lift_fresh.default" not in ops.names
    assert not any(name.startswith("aten.index_put") for name in ops.names)


def test_the_batch_keeps_its_order_and_values_whatever_the_mix_of_sizes():
    images = _images()
    together = preprocess_on_device(images, PARAMS, CPU)
    one_by_one = torch.cat([preprocess_on_device([image], PARAMS, CPU) for image in images])
    torch.testing.assert_close(together, one_by_one)
    mean = torch.tensor(PARAMS.mean).view(3, 1, 1)
    std = torch.tensor(PARAMS.std).view(3, 1, 1)
    flat = torch.from_numpy(images[3]).permute(2, 0, 1).float()  # 224x224: no resize, no crop
    torch.testing.assert_close(together[3], (flat / 255 - mean) / std, atol=1e-6, rtol=1e-6)
