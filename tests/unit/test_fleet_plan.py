"""How `clip-worker fleet` lays processes on devices."""

from worker.commands.fleet import Slot, child_command, plan_slots


def test_plan_pins_processes_to_gpus():
    slots = plan_slots([0, 1], per_gpu=2, cpu_processes=1, metrics_port_base=9400)
    assert [(s.gpu, s.metrics_port) for s in slots] == [(0, 9400), (0, 9401), (1, 9402), (1, 9403)]
    command, env = child_command(Slot(3, 1, 9403), ["--batch-size", "64"])
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert command[-6:] == ["--metrics-port", "9403", "--client-id", "clip-worker-3", "--device", "cuda:0"]
    assert [s.gpu for s in plan_slots([], per_gpu=1, cpu_processes=3, metrics_port_base=0)] == [None] * 3
