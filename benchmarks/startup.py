"""Start-up time of the kd commands that need no model, median of 5, against `python -c pass` and
`python -c "import torch"` measured in the same run (what each call would pay if kd imported torch).

    python benchmarks/startup.py
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KD = [sys.executable, "-m", "kd_cli"]
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "kd --help": [*KD, "--help"],
    "kd distill --help": [*KD, "distill", "--help"],
    "kd distill --cfg job": [*KD, "distill", "--cfg", "job"],
    "kd distill trainer.epochs=0 (error)": [*KD, "distill", "trainer.epochs=0"],
    "kd distill method=kdd (error)": [*KD, "distill", "method=kdd"],
}


def median_seconds(command: list[str], cwd: Path, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, cwd=cwd, capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = {name: median_seconds(command, Path(folder), args.repeats) for name, command in COMMANDS.items()}
    torch_import = results["python -c 'import torch'"]
    print(f"{'command':<40} {'median s':>9} {'/ import torch':>15}")
    for name, seconds in results.items():
        print(f"{name:<40} {seconds:>9.2f} {seconds / torch_import:>15.2f}")


if __name__ == "__main__":
    main()
