"""Benchmark results: rows printed as an aligned table and saved as JSON."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Row:
    """One measurement."""

    section: str
    case: str
    images_per_s: float
    detail: dict[str, Any] = field(default_factory=dict)
    failed: str | None = None  # why the row could not be trusted; its images/s then mean nothing


@dataclass
class Report:
    """All measurements of one run plus where they were taken."""

    rows: list[Row] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, dict[str, Any]] = field(default_factory=dict)
    fidelity: dict[str, dict[str, Any]] = field(default_factory=dict)
    host_cost: dict[str, Any] = field(default_factory=dict)  # the host-cost section's stage breakdown
    output: Path | None = None  # when set, the JSON is rewritten after every row

    def add(
        self, section: str, case: str, images_per_s: float, failed: str | None = None, **detail: Any
    ) -> Row:
        """Record and return one row (``failed`` says why it cannot be trusted), and save the report."""
        row = Row(section, case, round(images_per_s, 2), detail, failed)
        self.rows.append(row)
        mark = f"  FAILED: {failed}" if failed else ""
        print(f"  {section:<11} {case:<44} {images_per_s:>10.1f} img/s  {_detail(detail)}{mark}", flush=True)
        self.checkpoint()
        return row

    def checkpoint(self) -> None:
        """Save to :attr:`output` if set, so a run cut short still leaves what it measured."""
        if self.output is not None:
            self.save(self.output)

    def failures(self) -> list[Row]:
        """The rows that failed."""
        return [row for row in self.rows if row.failed]

    def best(self, section: str) -> float:
        """Highest images/s of a section (0 if none)."""
        return max((row.images_per_s for row in self.rows if row.section == section), default=0.0)

    def table(self) -> str:
        """A markdown table of every row and the ratios."""
        lines = ["| section | case | images/s | detail |", "| --- | --- | ---: | --- |"]
        for row in self.rows:
            failed = f" FAILED: {row.failed}" if row.failed else ""
            lines.append(
                f"| {row.section} | {row.case} | {row.images_per_s:.1f} | {_detail(row.detail)}{failed} |"
            )
        for name, value in self.ratios.items():
            lines.append(f"| ratio | {name} | {value:.2f} | |")
        for mode, facts in self.parity.items():
            lines.append(
                f"| parity | {mode} | | max abs diff {facts['max_abs_diff']:.2e}, "
                f"min cosine {facts['min_cosine']:.6f} over {facts['images']} images |"
            )
        for name, facts in self.fidelity.items():
            lines.append(f"| fidelity | {name} | | {_detail(facts)} |")
        if self.host_cost:
            lines += ["", *host_cost_table(self.host_cost)]
        return "\n".join(lines)

    def save(self, path: Path) -> None:
        """Write the report as JSON."""
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "machine": self.machine,
            "rows": [asdict(r) for r in self.rows],
            "ratios": self.ratios,
            "parity": self.parity,
            "fidelity": self.fidelity,
            "host_cost": self.host_cost,
        }
        partial = path.with_name(path.name + ".part")
        partial.write_text(json.dumps(payload, indent=2) + "\n")
        partial.replace(path)  # never a half-written file if the run is killed mid-write


def host_cost_table(facts: dict[str, Any]) -> list[str]:
    """The host-cost section's stages as markdown: CPU and GIL-held microseconds per image."""
    lines = [
        "| host cost per image | CPU us | GIL us | GIL us while on CPU | share of host GIL |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in facts["stages"]:
        share = f"{row['gil_share']:.0%}" if row["gil_share"] is not None else "not counted"
        lines.append(
            f"| {row['stage']} | {row['cpu_us']:.1f} | {row['gil_us']:.1f} | {row['gil_on_cpu_us']:.1f} "
            f"| {share} |"
        )
    host = facts["host"]
    lines.append(
        f"| **host total** (all but the stand-ins) | **{host['cpu_us']:.1f}** | **{host['gil_us']:.1f}** "
        f"| **{host['gil_on_cpu_us']:.1f}** | 100% |"
    )
    floor = facts["kafka_python_floor"]
    client = facts.get("kafka_client", "kafka-python")
    for side in ("consumer", "producer"):
        lines.append(
            f"| {client} floor: {side} | {floor[side]['cpu_us']:.1f} | {floor[side]['gil_us']:.1f} | | |"
        )
    # librdkafka's own code has no Python frames: this row is kafka-python's alone.
    lines.append(f"| kafka-python's own code, all stages | | {floor['gil_us_own_code']:.1f} | | |")
    check = facts["cross_check"]
    lines.append(
        f"| implied ceiling: {facts['implied_ceiling_images_per_s']:.0f} images/s "
        f"({facts['implied_ceiling_on_cpu_images_per_s']:.0f} without preemption) | | | | "
        f"GIL busy {check['gil_busy_at_unprofiled_rate']:.0%} "
        f"at {facts['unprofiled_images_per_s']:.0f} images/s "
        f"unprofiled ({check['wall_us_per_image']:.0f} us wall per image) |"
    )
    return lines


def _detail(detail: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in detail.items())


def machine_facts() -> dict[str, Any]:
    """CPU, GPU and library versions, recorded with every run."""
    import os

    import transformers

    facts: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return facts
