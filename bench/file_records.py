"""What checking a cached file costs: lvb.workdir's record (size, mtime, SHA-256).

Writes a file of --mib MiB of random bytes under bench/out (reused), then times, with the
file in the page cache: SHA-256 (what a record keeps, computed once when lvb writes the
file), BLAKE2b, CRC32 and a stat (what a reuse costs when the file's time is unchanged),
and scales each to the 2 GiB of an 11B embedding's weights. Prints a table and records it in
bench/results/file_records.json.

    .venv/bin/python bench/file_records.py [--mib 512]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from common import record_result  # noqa: E402

from lvb.workdir import matches_record, record_file  # noqa: E402


def timed(function, repeat: int = 3) -> tuple[float, float]:
    """Best wall and CPU seconds of `repeat` runs (CPU time stays meaningful on a busy machine)."""
    wall = cpu = float("inf")
    for _ in range(repeat):
        started, started_cpu = time.perf_counter(), time.process_time()
        function()
        wall, cpu = min(wall, time.perf_counter() - started), min(cpu, time.process_time() - started_cpu)
    return wall, cpu


def read_through(path: Path, update) -> None:
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            update(block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    args = parser.parse_args()
    path = Path(__file__).parent / "out" / f"records-{args.mib}MiB.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.stat().st_size != args.mib << 20:
        with open(path, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
    read_through(path, lambda block: None)  # into the page cache
    scale = (2 << 30) / path.stat().st_size
    record = record_file(path)
    rows = [
        ("read only", timed(lambda: read_through(path, lambda b: None))),
        ("SHA-256 (record_file)", timed(lambda: read_through(path, hashlib.sha256().update))),
        ("BLAKE2b", timed(lambda: read_through(path, hashlib.blake2b().update))),
        ("CRC32", timed(lambda: read_through(path, lambda b: zlib.crc32(b)))),
        ("matches_record, time unchanged (stat)", timed(lambda: matches_record(path, record), repeat=100)),
    ]
    size = path.stat().st_size
    print(f"file: {size >> 20} MiB, in the page cache; load average {os.getloadavg()[0]:.1f}; figures scaled to 2 GiB\n")
    print("| check | wall s per 2 GiB | CPU s per 2 GiB | GB/s (CPU) |")
    print("|---|---|---|---|")
    for name, (wall, cpu) in rows:
        if "stat" in name:  # one call, whatever the size
            print(f"| {name} | {wall * 1e6:.0f} µs per file | {cpu * 1e6:.0f} µs | - |")
        else:
            print(f"| {name} | {wall * scale:.2f} | {cpu * scale:.2f} | {size / max(cpu, 1e-9) / 1e9:.2f} |")
    record_result("file_records", {"mib": args.mib, "scaled_to_bytes": 2 << 30, "rows": [
        {"check": name, "wall_s": wall, "cpu_s": cpu, "per_file": "stat" in name} for name, (wall, cpu) in rows]})

if __name__ == "__main__":
    main()
