"""One summary table of a ``.ci/gpu-bench`` run, from the bench's JSON and the GPU tests' output.

``python -m worker.devtools.bench.summary --results bench.json [--tests gpu-tests.txt]`` prints the card,
dtype and batch size, model-only and end-to-end images/s with the GPU busy share, parity and fidelity
figures, the GPU tests' outcome, the issue's targets, and every failed row.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

TARGETS = {"end to end": 2500.0, "model alone": 3500.0, "GPU busy": 90.0}
GPU_SOURCES = ("nvml", "nvidia-smi")


def _rows(report: dict[str, Any], section: str) -> list[dict[str, Any]]:
    return [row for row in report.get("rows", []) if row["section"] == section]


def _model_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    lines = []
    for row in _rows(report, "model"):
        detail = row["detail"]
        compiled = f", {detail['compile']}" if "compile" in detail else ""
        skipped = " (CUDA graphs SKIPPED)" if detail.get("graphs_skipped") else ""
        value = _rate(row) + f" ({detail.get('ms_per_batch', '?')} ms/batch){skipped}"
        lines.append((f"model only, {row['case'].split(',')[0]}, {detail.get('dtype')}{compiled}", value))
    for row in _rows(report, "copy"):
        lines.append(
            (f"host-to-device copy, {row['case']}", _rate(row) + f", {row['detail']['gb_per_s']} GB/s")
        )
    return lines


def _end_to_end(report: dict[str, Any]) -> list[tuple[str, str]]:
    lines = []
    for row in _rows(report, "end-to-end") + _rows(report, "bare"):
        detail = row["detail"]
        facts = [f"{_busy_label(detail)} {detail['gpu_busy']}"] if "gpu_busy" in detail else []
        facts += [f"model busy {detail['model_busy']}"] if "model_busy" in detail else []
        if detail.get("dead_letters") or detail.get("device_decode_fallbacks"):
            facts.append(
                f"dead letters {detail['dead_letters']}, fallbacks {detail['device_decode_fallbacks']}"
            )
        value = _rate(row) + (f" ({'; '.join(facts)})" if facts else "")
        lines.append((f"{row['section']}: {row['case']}", value))
    return lines


def _busy_label(detail: dict[str, Any]) -> str:
    source = detail.get("gpu_busy_source")
    return "GPU busy" if source in GPU_SOURCES else f"busy ({source}, not a GPU)"


def _rate(row: dict[str, Any]) -> str:
    return "FAILED" if row.get("failed") else f"{row['images_per_s']:,.0f} images/s"


def _fidelity(report: dict[str, Any]) -> list[tuple[str, str]]:
    lines = []
    for mode in ("device", "device+decode", "torch", "pil"):
        facts = report.get("parity", {}).get(mode)
        if facts:
            lines.append(
                (
                    f"parity vs reference, {mode} ({facts.get('device', '?')})",
                    f"min cosine {facts['min_cosine']:.6f}, max abs diff {facts['max_abs_diff']:.2e}"
                    f" over {facts['images']} images",
                )
            )
    for name, facts in report.get("fidelity", {}).items():
        lines.append(
            (f"fidelity, {name}", f"min cosine {facts['min_cosine']:.6f} over {facts['images']} images")
        )
    return lines


def _tests(path: Path | None) -> list[tuple[str, str]]:
    if path is None or not path.is_file():
        return [("tests/gpu", "no output")]
    text = path.read_text(errors="replace")
    outcome = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error).*?)\s*=*$", text, re.MULTILINE)
    lines = [("tests/gpu", outcome[-1] if outcome else "no pytest summary (cut short?)")]
    lines += [("tests/gpu failed", name) for name in re.findall(r"^FAILED (\S+)", text, re.MULTILINE)]
    lines += [
        ("tests/gpu figure", line.split("FIGURES", 1)[1].strip())
        for line in text.splitlines()
        if "FIGURES" in line
    ]
    return lines


def _targets(report: dict[str, Any]) -> list[tuple[str, str]]:
    def best(rows: list[dict[str, Any]], key: str = "images_per_s") -> float:
        return max((float(r[key]) for r in rows if not r.get("failed")), default=0.0)

    workers = [r for r in _rows(report, "end-to-end") if r["case"].startswith("clip-worker")]
    dtype = report.get("machine", {}).get("dtype")
    model = [r for r in _rows(report, "model") if r["detail"].get("dtype") == dtype]
    busy = [
        float(r["detail"]["gpu_busy"].rstrip("%"))
        for r in workers
        if str(r["detail"].get("gpu_busy", "n/a")).endswith("%")
        and r["detail"].get("gpu_busy_source") in GPU_SOURCES
        and not r.get("failed")
    ]
    figures = {"end to end": best(workers), "model alone": best(model), "GPU busy": max(busy, default=0.0)}
    lines = []
    for name, target in TARGETS.items():
        figure = figures[name]
        unit = "%" if name == "GPU busy" else " images/s"
        verdict = "met" if figure >= target else "MISSED"
        lines.append((f"target: {name} >= {target:,.0f}{unit}", f"{verdict} (best {figure:,.0f}{unit})"))
    return lines


def summary(report: dict[str, Any], tests: Path | None) -> str:
    """The summary table as markdown."""
    machine = report.get("machine", {})
    lines: list[tuple[str, str]] = [
        ("card", str(machine.get("gpu") or f"none: {machine.get('device', '?')} (a CPU rehearsal)")),
        ("model", str(machine.get("model", "?"))),
        ("dtype, batch size", f"{machine.get('dtype', '?')}, {machine.get('batch_size', '?')}"),
        ("torch, CPU cores", f"{machine.get('torch', '?')}, {machine.get('cpu_cores', '?')}"),
    ]
    lines += _model_rows(report) + _end_to_end(report)
    lines += [(f"ratio: {name}", f"{value:.2f}") for name, value in report.get("ratios", {}).items()]
    lines += _fidelity(report) + _tests(tests) + _targets(report)
    failed = [row for row in report.get("rows", []) if row.get("failed")]
    lines += [(f"FAILED ROW: {row['section']}: {row['case']}", row["failed"]) for row in failed]
    if not failed:
        lines.append(("failed rows", "none"))
    table = ["| figure | value |", "| --- | --- |"]
    table += [f"| {name} | {value.replace('|', '/')} |" for name, value in lines]
    return "\n".join(table)


def main(argv: list[str] | None = None) -> int:
    """Print the summary; 1 if the results file is missing (the bench never got to write it)."""
    parser = argparse.ArgumentParser(description="summary table of a .ci/gpu-bench run")
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--tests", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.results.is_file():
        print(f"no results at {args.results}: the bench wrote nothing")
        print(summary({}, args.tests))
        return 1
    print(summary(json.loads(args.results.read_text()), args.tests))
    return 0


if __name__ == "__main__":
    sys.exit(main())
