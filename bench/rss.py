"""Peak RSS of converting the embedded default with 3 shards and with 12 shards of about the same size each.

Each conversion is a fresh `hlwq convert` process started by a small wrapper process that prints the child's
ru_maxrss, so nothing else (writing the checkpoint, this script) is counted. Flat means streaming works.
Run: .venv/bin/python bench/rss.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.tiny import write_tiny_checkpoint  # noqa: E402

_WRAPPER = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, capture_output=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def convert_peak_rss(shards: int, tmp: Path) -> tuple[int, float, int]:
    src = write_tiny_checkpoint(tmp / f"src{shards}", shards=shards, layers=2 * shards)
    manifest = tmp / f"m{shards}.yaml"
    manifest.write_text(f"name: rss{shards}\nsource: {{path: {src}}}\ndestination: {{path: {tmp / f'pub{shards}'}}}\n")
    cmd = [sys.executable, "-m", "pipeline.cli", "convert", str(manifest), "--workdir", str(tmp / f"w{shards}")]
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], check=True, capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    return int(out.stdout.strip().splitlines()[-1]), time.perf_counter() - t0, size


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for shards in (3, 12):  # 2 decoder layers per shard in both cases: about the same bytes per shard
            peak, seconds, size = convert_peak_rss(shards, Path(d))
            results[shards] = peak
            print(f"rss  {shards:>2} shards ({size / shards / 1e6:.2f} MB each, {size / 1e6:.1f} MB BF16 in all): "
                  f"peak RSS {peak / 1e6:.0f} MB, convert {seconds:.1f} s")  # fmt: skip
    print(f"rss  ratio 12 shards / 3 shards: {results[12] / results[3]:.3f} (flat = 1.0)")
    print(json.dumps({str(k): v for k, v in results.items()}))


if __name__ == "__main__":
    main()
