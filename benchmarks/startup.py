"""Start-up time of the everyday `sft` commands, against `python -c pass` and `python -c "import torch"`.

    python benchmarks/startup.py [--repeats 7] [--markdown]

Each command runs in a fresh process (the installed `sft` entry point) on a small store built first;
the figure is the best wall time over the repeats (the machine's noise only ever adds time). Target:
<= 0.3 s, and none of these commands imports torch or transformers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from table import render_table  # benchmarks/table.py (the script's folder is on sys.path)

TARGET_SECONDS = 0.3


def best_wall(argv: list[str], env: dict[str, str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - started)
    return min(times)


def build_store(root: Path) -> tuple[Path, Path]:
    """A store holding one task delta for a tiny base (built here, so the timed commands have work)."""
    from sftstore.demo import NER_LABELS, build_tiny_base, synthetic_delta
    from sftstore.modeling import load_model
    from sftstore.store import DeltaStore

    base = build_tiny_base(root / "tiny-bert")
    model = load_model(base, "token-classification", NER_LABELS)
    DeltaStore(root / "store").add(synthetic_delta(model, density=0.05, seed=2, kind="task", task="ner",
                                                   task_type="token-classification", labels=NER_LABELS))
    return root / "store", base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    sft = shutil.which("sft") or str(Path(sys.executable).parent / "sft")
    with tempfile.TemporaryDirectory(prefix="sft-startup-") as tmp:
        store, base = build_store(Path(tmp))
        env = {**os.environ, "SFTSTORE_HOME": str(store), "SFTSTORE_BASE": str(base), "HF_HUB_OFFLINE": "1"}
        python = best_wall([sys.executable, "-c", "pass"], env, args.repeats)
        torch = best_wall([sys.executable, "-c", "import torch"], env, args.repeats)
        rows = [(" ".join(["sft", *command]), best_wall([sft, *command], env, args.repeats))
                for command in (["--help"], ["list"], ["show", "task/ner"], ["search", "--lang", "hau"],
                                ["tag", "task/ner@1", "best"])]
    print(f"best of {args.repeats} runs each; python -c pass {python:.3f} s, python -c 'import torch' {torch:.3f} s")
    header = ("command", "wall", "x python -c pass", "/ import torch", f"target <= {TARGET_SECONDS} s")
    lines = [(name, f"{wall:.3f} s", f"{wall / python:.1f}x", f"{wall / torch:.2f}",
              "met" if wall <= TARGET_SECONDS else "MISSED") for name, wall in rows]
    print(render_table(header, lines, args.markdown))


if __name__ == "__main__":
    main()
