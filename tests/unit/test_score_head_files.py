"""Score-head files are read with bounds: a zip bomb is refused before it is inflated (declared sizes) and
while it is (actual sizes), and so are weight files, torch records and zip directories past the bound; a
pickled head is refused naming the safe file to use, never passing on advice to run its code."""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tests.support.score_heads import random_state, save_random_heads
from worker.errors import ModelLoadError
from worker.models import heads
from worker.models.checkpoint import ModelSpec
from worker.models.heads import HEADS, MAX_HEAD_BYTES, load_head, read_at_most

REPO = Path(__file__).resolve().parents[2]
BOMB_MEMBER = "clip_autokeras_binary_nsfw.pth"
# Far over the bound and over any container's memory budget, while the zip stays about 2 MB.
BOMB_BYTES = 2 * 2**30
# What loading a refused head may add to the process's peak memory (torch alone is several hundred MB).
RSS_GROWTH_BOUND_KIB = 100 * 1024

# Loads the head in a fresh interpreter and prints, in KiB: the peak before loading (torch's import), the
# memory held then, and the peak while loading, from the process's own counters (a child's ru_maxrss can
# carry its parent's peak); the high-water mark is reset to the memory held once torch is imported.
MEASURE = """
import json, re, sys
from worker.errors import ModelLoadError
from worker.models.checkpoint import ModelSpec
from worker.models.heads import load_head

def status(field):
    with open("/proc/self/status") as lines:
        return int(re.search(field + r":\\s+(\\d+)", lines.read()).group(1))

import_peak = status("VmHWM")
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")
held = status("VmRSS")
message = None
try:
    load_head("nsfw", ModelSpec(model=sys.argv[1]), "--nsfw-head")
except ModelLoadError as exc:
    message = str(exc)
peak = status("VmHWM")
figures = {"import_peak_kib": import_peak, "held_kib": held, "load_peak_kib": peak}
print(json.dumps({**figures, "message": message}))
"""


def _one_line_error(name: str, location: Path) -> str:
    with pytest.raises(ModelLoadError) as caught:
        load_head(name, ModelSpec(model=str(location)), f"--{name}-head")
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="session")
def zip_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A zip of about 2 MB whose one member is a 2 GiB ``.pth`` of zeros."""
    archive = tmp_path_factory.mktemp("bomb") / "clip_autokeras_binary_nsfw.zip"
    zeros = bytes(2**20)
    with (
        zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out,
        out.open(BOMB_MEMBER, "w", force_zip64=True) as member,
    ):
        for _ in range(BOMB_BYTES // len(zeros)):
            member.write(zeros)
    return archive


@pytest.fixture(scope="session")
def lying_zip_bomb(zip_bomb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zip bomb with its member declaring 1 KiB: only reading it can tell."""
    archive = tmp_path_factory.mktemp("lying") / zip_bomb.name
    shutil.copyfile(zip_bomb, archive)
    data = bytearray(archive.read_bytes())
    entry = data.rindex(b"PK\x01\x02")
    name_length = struct.unpack_from("<H", data, entry + 28)[0]
    extra = entry + 46 + name_length
    # Over 4 GiB-1 or not, a zip64 entry keeps its sizes in the zip64 extra field, inflated size first.
    assert struct.unpack_from("<L", data, entry + 24)[0] == 0xFFFFFFFF
    assert struct.unpack_from("<HHQ", data, extra) == (1, 16, BOMB_BYTES)
    struct.pack_into("<Q", data, extra + 4, 1024)
    archive.write_bytes(data)
    with zipfile.ZipFile(archive) as check:
        assert check.getinfo(BOMB_MEMBER).file_size == 1024
    return archive


def _measure(location: Path) -> dict[str, object]:
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, str(location)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    measured: dict[str, object] = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"{location.name}: {measured}")  # the figures, with pytest -s
    return measured


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc and ru_maxrss in KiB")
@pytest.mark.parametrize("lying", [False, True], ids=["declared", "declares-1KiB"])
def test_a_zip_bomb_head_is_refused_in_one_line_without_inflating_it(
    zip_bomb: Path, lying_zip_bomb: Path, lying: bool
):
    archive = lying_zip_bomb if lying else zip_bomb
    assert archive.stat().st_size < 5 * 2**20
    measured = _measure(archive)
    message = measured["message"]
    assert isinstance(message, str) and "\n" not in message
    assert BOMB_MEMBER in message and "--nsfw-head" in message
    if lying:
        # zipfile stops at the declared size and the CRC then fails: the bytes past it are never inflated.
        assert "CRC" in message
    else:
        assert f"declares {BOMB_BYTES:,} bytes" in message and "64 MiB bound" in message
    peak, held = measured["load_peak_kib"], measured["held_kib"]
    assert isinstance(peak, int) and isinstance(held, int)
    assert peak - held < RSS_GROWTH_BOUND_KIB, measured


def test_reading_stops_once_a_stream_passes_the_bound():
    class Endless:
        """Zeros without end, as a member inflating past what it declares gives them."""

        served = 0

        def read(self, size: int = -1) -> bytes:
            assert 0 < size <= 2**20, "never all at once"
            self.served += size
            return bytes(size)

    stream = Endless()
    assert read_at_most(stream, 5 * 2**20 + 3) is None
    assert stream.served == 5 * 2**20 + 4
    assert read_at_most(io.BytesIO(b"x" * 100), 100) == b"x" * 100
    assert read_at_most(io.BytesIO(b"x" * 101), 100) is None


def _deflated(torch_file: Path) -> None:
    """Rewrite a torch file with its records deflated (torch reads those too)."""
    with zipfile.ZipFile(torch_file) as plain:
        records = [(info.filename, plain.read(info)) for info in plain.infolist()]
    with zipfile.ZipFile(torch_file, "w", zipfile.ZIP_DEFLATED) as out:
        for name, data in records:
            out.writestr(name, data)


def test_a_torch_file_whose_records_inflate_past_the_bound_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(heads, "MAX_HEAD_BYTES", 2**20)
    nested = tmp_path / "nested.pth"
    torch.save({"w": torch.zeros(2**19)}, nested)  # 2 MiB of records in a file of a few KB
    _deflated(nested)
    assert nested.stat().st_size < 2**20
    message = _one_line_error("nsfw", nested)
    assert "records declare" in message and "1 MiB bound" in message
    archive = tmp_path / "nested.zip"
    with zipfile.ZipFile(archive, "w") as out:
        out.write(nested, BOMB_MEMBER)
    assert "records declare" in _one_line_error("nsfw", archive)


def test_weight_files_over_the_bound_are_refused_by_their_size_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    locations = save_random_heads(tmp_path)
    monkeypatch.setattr(heads, "MAX_HEAD_BYTES", 2**19)
    for name, location in locations.items():
        message = _one_line_error(name, location)
        assert "0.5 MiB bound" in message and f"--{name}-head" in message


def test_a_zip_member_declaring_more_than_the_bound_is_refused_before_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    pth = save_random_heads(tmp_path)["nsfw"]
    archive = tmp_path / "heads.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        out.write(pth, BOMB_MEMBER)
    monkeypatch.setattr(heads, "MAX_HEAD_BYTES", pth.stat().st_size - 1)
    monkeypatch.setattr(zipfile.ZipFile, "open", None)  # never opened
    message = _one_line_error("nsfw", archive)
    assert f"{BOMB_MEMBER} declares {pth.stat().st_size:,} bytes" in message


def test_a_zip_with_too_many_entries_is_refused_before_they_are_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for index in range(25):
            out.writestr(f"{index}.txt", b"")
    monkeypatch.setattr(heads, "MAX_ZIP_ENTRIES", 24)
    monkeypatch.setattr(zipfile.ZipFile, "__init__", None)  # never listed
    message = _one_line_error("nsfw", archive)
    assert "25 zip entries, over the 24" in message


class _OpensAFile:
    """Unpickling this object creates ``path``: what running a pickled head's code would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


SAFE_FILES = {"aesthetic": "model.safetensors", "nsfw": "clip_autokeras_binary_nsfw.pth"}


@pytest.mark.parametrize("container", ["pth", "legacy-pth", "zip"])
@pytest.mark.parametrize("name", sorted(HEADS))
def test_a_pickled_head_is_refused_naming_the_safe_file_and_never_run(
    tmp_path: Path, name: str, container: str
):
    ran = tmp_path / "ran"
    pickled = tmp_path / "head.pth"
    state: dict[str, object] = {**random_state(name, 1), "extra": _OpensAFile(ran)}
    torch.save(state, pickled, _use_new_zipfile_serialization=container != "legacy-pth")
    location = pickled
    if container == "zip":
        location = tmp_path / "head.zip"
        with zipfile.ZipFile(location, "w") as out:
            out.write(pickled, BOMB_MEMBER)
    message = _one_line_error(name, location)
    assert not ran.exists()
    assert "weights_only" not in message and "False" not in message
    assert "pickled code beyond tensors (it calls io.open)" in message
    assert SAFE_FILES[name] in message and f"--{name}-head" in message


def test_no_message_in_the_loader_passes_on_the_advice_to_run_pickled_code():
    assert "weights_only=False" not in Path(heads.__file__).read_text()


def test_the_bound_leaves_room_for_the_published_heads_many_times_over():
    for head in HEADS.values():
        size = sum(tensor.numel() * 4 for tensor in head().state_dict().values())
        assert size * 16 < MAX_HEAD_BYTES, head.name
