"""Ways to move a warm safetensors checkpoint into GPU memory, side by side in one run.

    python benchmarks/read_paths.py --dir CKPT [--repeat 3] [--json]

Each path moves every shard's bytes (headers included) into one device buffer; the page
cache is warmed first. The anchors of a load's speed:
  seq_read      one thread, ``readinto`` 64 MiB chunks into one reused buffer (no GPU)
  pread_pinned  16 threads ``preadv`` into a pinned buffer (no GPU)
  h2d_pinned    pinned buffer -> device, ``copy_`` (no file)
  pipelined     16-thread ``preadv`` into a ring of pinned buffers while the previous
                buffer copies to the device (the shape of loadfsm's reader): the ceiling
                of any path that copies through host memory on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

CHUNK = 64 << 20
THREADS = 16


def _files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def _chunks(files):
    """(file, offset, nbytes, destination offset) for every CHUNK of every file."""
    at = 0
    for path in files:
        size = path.stat().st_size
        for offset in range(0, size, CHUNK):
            n = min(CHUNK, size - offset)
            yield path, offset, n, at
            at += n


def _preadv(fd: int, out: torch.Tensor, offset: int, pool: ThreadPoolExecutor) -> None:
    import ctypes
    n = out.numel()
    view = memoryview((ctypes.c_ubyte * n).from_address(out.data_ptr())).cast("B")
    step = max(1 << 20, -(-n // THREADS))

    def part(i):
        done, buf = 0, view[i:i + step]
        while done < len(buf):
            done += os.preadv(fd, [buf[done:]], offset + i + done)

    list(pool.map(part, range(0, n, step)))


def seq_read(files, total, device, pool):
    buf = bytearray(CHUNK)
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - start


def pread_pinned(files, total, device, pool):
    pinned = torch.empty(CHUNK, dtype=torch.uint8, pin_memory=True)
    start = time.perf_counter()
    for path, offset, n, _ in _chunks(files):
        fd = os.open(path, os.O_RDONLY)
        _preadv(fd, pinned[:n], offset, pool)
        os.close(fd)
    return time.perf_counter() - start


def h2d_pinned(files, total, device, pool):
    pinned = torch.empty(CHUNK, dtype=torch.uint8, pin_memory=True)
    dest = torch.empty(total, dtype=torch.uint8, device=device)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _, _, n, at in _chunks(files):
        dest[at:at + n].copy_(pinned[:n], non_blocking=True)
    torch.cuda.synchronize(device)
    return time.perf_counter() - start


def pipelined(files, total, device, pool, slots: int = 4):
    """A reader thread fills a ring of pinned chunks; the main thread copies each to the
    device (a chunk is refilled once its copy finished: loadfsm's ``PinnedRing``)."""
    from loadfsm.sources.pinned import PinnedRing
    ring = PinnedRing(CHUNK, device, slots)
    dest = torch.empty(total, dtype=torch.uint8, device=device)
    ready: queue.Queue = queue.Queue()
    stop = threading.Event()
    fds = {path: os.open(path, os.O_RDONLY) for path in files}

    def reader():
        for path, offset, n, at in _chunks(files):
            slot, buffer = ring.acquire(stop)
            _preadv(fds[path], buffer[:n], offset, pool)
            ready.put((slot, buffer, n, at))
        ready.put(None)

    torch.cuda.synchronize(device)
    start = time.perf_counter()
    thread = threading.Thread(target=reader)
    thread.start()
    while (item := ready.get()) is not None:
        slot, buffer, n, at = item
        dest[at:at + n].copy_(buffer[:n], non_blocking=True)
        ring.release(slot)
    thread.join()
    torch.cuda.synchronize(device)
    for fd in fds.values():
        os.close(fd)
    return time.perf_counter() - start


PATHS = {"seq_read": seq_read, "pread_pinned": pread_pinned, "h2d_pinned": h2d_pinned,
         "pipelined": pipelined}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    files = _files(args.dir)
    total = sum(p.stat().st_size for p in files)
    device = torch.device("cuda")
    pool = ThreadPoolExecutor(THREADS)
    seq_read(files, total, device, pool)            # warm the page cache
    results = {}
    for _ in range(args.repeat):
        for name in args.paths.split(","):
            try:
                seconds = PATHS[name](files, total, device, pool)
            except Exception as exc:       # a path this machine cannot take: say which
                results.setdefault(name, {"error": repr(exc)})
                continue
            results.setdefault(name, {"seconds": []})["seconds"].append(seconds)
            torch.cuda.empty_cache()
    for name, r in results.items():
        if "seconds" in r:
            r["median_s"] = statistics.median(r["seconds"])
            r["gb_per_s"] = total / r["median_s"] / 1e9
    out = {"bytes": total, "paths": results}
    print(json.dumps(out) if args.json else "\n".join(
        f"{k:13} {v.get('gb_per_s', 0):7.2f} GB/s  {v.get('error', '')}"
        for k, v in results.items()))
    return out


if __name__ == "__main__":
    main()
