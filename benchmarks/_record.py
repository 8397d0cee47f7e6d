"""Write one benchmark's section into BENCHMARKS.md (atomically), leaving the others as they are."""
from __future__ import annotations

import os
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEach section is written by the script named in it; rerun that command to refresh it.\n"


def machine() -> str:
    import torch

    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def record_section(name: str, title: str, command: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- begin NAME -->`` and ``<!-- end NAME -->``."""
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else HEADER
    stamp = time.strftime("%Y-%m-%d %H:%M")
    section = (
        f"<!-- begin {name} -->\n## {title}\n\n"
        f"Command: `{command}` ({stamp}; {machine()})\n\n{body.strip()}\n<!-- end {name} -->\n"
    )
    pattern = re.compile(rf"<!-- begin {re.escape(name)} -->.*?<!-- end {re.escape(name)} -->\n?", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    tmp = BENCHMARKS.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, BENCHMARKS)
    print(f"wrote section {name!r} of {BENCHMARKS}", file=sys.stderr)


def markdown_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
