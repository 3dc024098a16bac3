"""Ingest benchmark: read + QC + preprocessing time and peak memory for the LIDC series.

    python benchmarks/ingest.py [--series PATH] [--repeat 3]

Peak memory is the process's resident set above its level after imports (sampled every 2 ms),
compared with the size of the volume as float32 HU. Target: under 5 s and under 3x the volume.
"""

from __future__ import annotations

import argparse
import threading
import time

import psutil


class PeakRSS:
    """Samples this process's RSS in a thread; ``peak - base`` is what the measured block added."""

    def __init__(self, interval: float = 0.002):
        self.proc, self.interval = psutil.Process(), interval

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def added_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def run_once(series: str):
    from common.io import read_ct, to_metatensor
    from common.qc import qc_volume
    from common.transforms import ct_preprocessing

    times = {}
    t = time.perf_counter()
    vol = read_ct(series, axcodes="RAS")  # filled in RAS: preprocessing needs no reorienting copy
    times["read"] = time.perf_counter() - t
    t = time.perf_counter()
    checks = qc_volume(vol)
    times["qc"] = time.perf_counter() - t
    t = time.perf_counter()
    out = ct_preprocessing(load=False)({"image": to_metatensor(vol)})["image"]  # orientation RAS + HU window
    times["preprocessing"] = time.perf_counter() - t
    assert all(c.passed for c in checks), [c.reason for c in checks if not c.passed]
    return vol, out, times


def main() -> None:
    from common.default_data import shared_data_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", default=str(shared_data_dir() / "lidc_idri_1011_dicom"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    run_once(args.series)  # warm the file cache and imports; the timed runs below read from disk cache
    results = []
    for _ in range(args.repeat):
        with PeakRSS() as mem:
            vol, out, times = run_once(args.series)
            volume_mb = vol.hu.nbytes / 2**20
            del vol, out
        results.append((times, mem.added_mb, volume_mb))
    best = min(results, key=lambda r: sum(r[0].values()))
    times, added, volume_mb = best
    total = sum(times.values())
    print(f"series: {args.series}")
    print(f"volume: {volume_mb:.0f} MB as float32 HU")
    for k, v in times.items():
        print(f"{k:>14s}: {v:6.2f} s")
    print(
        f"{'total':>14s}: {total:6.2f} s  (best of {args.repeat}; all runs: {', '.join(f'{sum(r[0].values()):.2f}' for r in results)} s)"
    )
    print(
        f"peak memory added: {added:.0f} MB = {added / volume_mb:.2f}x the volume (max over runs {max(r[1] for r in results) / volume_mb:.2f}x)"
    )


if __name__ == "__main__":
    main()
