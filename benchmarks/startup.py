"""What a fresh process pays before and around a prune: the CPU seconds (user + system) of
a new Python process that

- imports torch only (the floor every run pays);
- loads CleanAI's plugins (``get_plugin_manager()``);
- imports torchvision, builds ResNet-18 (random weights) and prunes it data-free
  (magnitude, ratio 0.5, one thread);
- runs ``cleanai plugins`` (the command line's start-up).

Each is run ``--repeats`` times in a fresh interpreter; the table gives the medians. With
``--ref PATH`` (another checkout of this repository, e.g. a ``git worktree`` of an older
commit) each row is also run with that checkout first on ``PYTHONPATH``, in the same
loop, so both columns see the same machine load.

    python benchmarks/startup.py [--repeats 5] [--ref ../old-checkout] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "import torch": "import torch",
    "load the plugins": "from cleanai_core.plugins import get_plugin_manager; get_plugin_manager()",
    "ResNet-18 data-free prune": (
        "import torch, torchvision\n"
        "from cleanai_core import StructuredPruner\n"
        "torch.set_num_threads(1)\n"
        "m = torchvision.models.resnet18().eval()\n"
        "StructuredPruner(m, torch.randn(1, 3, 224, 224), 'magnitude', pruning_ratio=0.5).prune()"
    ),
    "cleanai plugins": "import sys; from cleanai_core.cli import main; sys.exit(main(['plugins']))",
}


def cpu_seconds(code: str, root: Path) -> float:
    """User + system CPU seconds of a fresh interpreter running ``code`` with ``root`` first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, cwd=root)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ref", type=Path, default=None, help="another checkout to compare with")
    ap.add_argument("--out", type=Path, default=None, help="append the table to this markdown file")
    args = ap.parse_args()
    roots = {"this checkout": ROOT} | ({f"ref ({args.ref.name})": args.ref.resolve()} if args.ref else {})
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for case, code in CASES.items():
            for label, root in roots.items():
                times.setdefault((case, label), []).append(cpu_seconds(code, root))
    cells = [f"{label} CPU s" for label in roots] + (["ratio"] if args.ref else [])
    head = "| run (fresh process) | " + " | ".join(cells) + " |"
    lines = [head, "|---" * (len(roots) + 1 + bool(args.ref)) + "|"]
    for case in CASES:
        got = [statistics.median(times[(case, label)]) for label in roots]
        ratio = f" {got[0] / got[1]:.2f} |" if args.ref else ""
        lines.append(f"| {case} | " + " | ".join(f"{v:.2f}" for v in got) + " |" + ratio)
    load = os.getloadavg()[0]
    lines.append("")
    lines.append(f"Medians of {args.repeats} fresh processes; 1-minute load average at the end: {load:.1f}.")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with args.out.open("a") as f:
            f.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
