"""Print ``rcdm bench`` JSON results as a Markdown table (for docs/speed.md).

Usage: python benchmarks/table.py results/bench/cpu/unet_small.json [more.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def table(paths: list[str]) -> str:
    """One Markdown row per measurement of every file, in file order."""
    lines = [
        "| benchmark | variant | case | option | images/s | s per call: median (min-max), n | "
        "vs fp32 eager | vs plain |",
        "| --- | --- | --- | --- | ---: | --- | ---: | ---: |",
    ]
    for path in paths:
        for r in json.loads(Path(path).read_text())["rows"]:
            case = f"{r['sampler']}:{r['steps']}" if r.get("sampler") else ""
            plain = r.get("plain_option")
            vs_plain = (
                "" if not plain or plain == r.get("option") else f"{_ratio(r['speedup_vs_plain'])} vs {plain}"
            )
            timing = f"{r['median_s']:.3g} ({r['min_s']:.3g}-{r['max_s']:.3g}), {r['repeats']}"
            lines.append(
                f"| {r['benchmark']} | {r['variant']} | {case} | {r.get('option') or ''} | "
                f"{r['images_per_s']:.3g} | {timing} | {_ratio(r['speedup_vs_fp32_eager'])} | {vs_plain} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(table(sys.argv[1:]))
