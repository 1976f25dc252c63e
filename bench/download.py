"""Downloads: one big result file over loopback, `daemon.downloads.download` against `curl -o`, side by side.

    .venv/bin/python bench/download.py                     # 1 GiB, 3 rounds
    .venv/bin/python bench/download.py --size-mib 256 --rounds 5 --dir /dev/shm

A small HTTP server in its own process serves one file with Content-Length and `socket.sendfile` (so the server
is not what limits either client). Each round downloads the same URL once with `curl -s -o FILE` and once with
`daemon.downloads.download` through the adapters' `httpx.Client` (`daemon.services.http.make_client`): streamed into
a temp file, SHA-256 computed on the way, length checked, fsynced, renamed into place. Both write into the same
directory (`--dir`, default a temp dir on the disk the results would go to). The order alternates between rounds.

Targets: our median throughput >= 0.8 x curl's, and the process RSS grows < 50 MiB while downloading (peak sampled
every 5 ms, plus ru_maxrss). The SHA-256 is checked against the file's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

TARGET_RATIO = 0.8
TARGET_RSS_MIB = 50.0
NAME = "chr_1.dose.vcf.gz"

SERVER = r"""
import json, os, socket, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
path = sys.argv[1]
size = os.path.getsize(path)

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        self.wfile.flush()
        with open(path, "rb") as f:
            self.connection.sendfile(f)

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(json.dumps({"port": server.server_address[1]}), flush=True)
server.serve_forever()
"""


def make_file(path: Path, size: int) -> str:
    """`size` bytes of incompressible data (a random MiB repeated with a counter); returns its SHA-256."""
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        written = 0
        i = 0
        while written < size:
            chunk = (i.to_bytes(8, "little") + block[8:])[: size - written]
            f.write(chunk)
            digest.update(chunk)
            written += len(chunk)
            i += 1
    return digest.hexdigest()


class RssSampler:
    """Peak VmRSS of this process while running (sampled every `interval` seconds)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, c.rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = c.rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, c.rss_mb())


def curl_once(url: str, dest: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["curl", "-s", "--fail", "-o", str(dest), url], check=True)
    elapsed = time.perf_counter() - started
    dest.unlink()
    return elapsed


def ours_once(client, url: str, result_dir: Path, expected_sha: str, size: int, chunk_size: int | None
              ) -> tuple[float, float, float, float]:
    """(seconds, CPU seconds of this process, peak RSS growth MiB, seconds spent in fsync)."""
    from daemon import downloads
    from daemon.services.deadlines import Budget
    from daemon.services.http import open_body

    kwargs = {"chunk_size": chunk_size} if chunk_size else {}
    before = c.rss_mb()
    synced = [0.0]
    real_fsync = os.fsync

    def timed_fsync(fd: int) -> None:  # curl -o does not fsync; say how much of our time durability costs
        t = time.perf_counter()
        real_fsync(fd)
        synced[0] += time.perf_counter() - t

    cpu0 = time.process_time()
    started = time.perf_counter()
    os.fsync = timed_fsync
    try:
        with RssSampler() as rss:
            def body() -> Any:
                return open_body(client, url, call=f"download of {NAME}", budget=Budget.transfer())

            def rest(resume: Any) -> Any:  # resumable, as the pipeline downloads (nothing is cut off here)
                return open_body(client, url, call=f"download of {NAME}", budget=Budget.transfer(),
                                 headers={"Range": f"bytes={resume.offset}-"})

            got = downloads.download(body, NAME, result_dir=result_dir, open_rest=rest, **kwargs)
    finally:
        os.fsync = real_fsync
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    if got.sha256 != expected_sha or got.size != size:
        raise AssertionError(f"downloaded file differs: {got.size} bytes, sha256 {got.sha256}")
    got.path.unlink()
    return elapsed, cpu, rss.peak - before, synced[0]


def run(size: int, rounds: int, directory: Path | None, chunk_size: int | None) -> dict[str, float]:
    from daemon.services.http import make_client

    if shutil.which("curl") is None:
        raise SystemExit("curl is not installed (apt-get install curl)")
    work = Path(tempfile.mkdtemp(prefix="imputationd-bench-download-", dir=directory))
    server = None
    try:
        source = work / "served.bin"
        print(f"writing a {size / (1 << 20):.0f} MiB file …", flush=True)
        sha = make_file(source, size)
        server = subprocess.Popen([sys.executable, "-c", SERVER, str(source)], stdout=subprocess.PIPE, text=True)
        port = json.loads(server.stdout.readline())["port"]
        url = f"http://127.0.0.1:{port}/{NAME}"
        out = work / "out"
        out.mkdir()
        client = make_client(f"http://127.0.0.1:{port}", timeout=60)
        rss_start = c.rss_mb()
        maxrss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        curl_times, our_times, our_cpu, growth, fsyncs = [], [], [], [], []
        curl_once(url, out / "warmup")  # page cache warm for both
        for i in range(rounds):
            order = ("curl", "ours") if i % 2 == 0 else ("ours", "curl")
            for who in order:
                if who == "curl":
                    curl_times.append(curl_once(url, out / "curl.bin"))
                else:
                    t, cpu, g, synced = ours_once(client, url, out, sha, size, chunk_size)
                    fsyncs.append(synced)
                    our_times.append(t)
                    our_cpu.append(cpu)
                    growth.append(g)
            print(f"  round {i + 1}: curl {size / curl_times[-1] / 1e6:7.0f} MB/s   daemon.downloads "
                  f"{size / our_times[-1] / 1e6:7.0f} MB/s (CPU {our_cpu[-1]:.2f} s, fsync {fsyncs[-1]:.2f} s, "
                  f"RSS +{growth[-1]:.1f} MiB)",
                  flush=True)
        client.close()
        maxrss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - maxrss_start
        curl_rate = size / c.median(curl_times)
        our_rate = size / c.median(our_times)
        ratio = our_rate / curl_rate
        peak = max(max(growth), maxrss_growth)
        c.banner(f"download: {size / (1 << 20):.0f} MiB over loopback, {rounds} rounds, into {work}")
        print(f"  curl -o           median {curl_rate / 1e6:7.0f} MB/s")
        print(f"  daemon.downloads  median {our_rate / 1e6:7.0f} MB/s  (hash + length check + fsync + rename; "
              f"CPU {c.median(our_cpu):.2f} s per file)")
        print(f"  ratio {ratio:.2f} x curl (target >= {TARGET_RATIO:g})   {c.verdict(ratio >= TARGET_RATIO)}")
        unsynced = size / (c.median(our_times) - c.median(fsyncs))
        print(f"  without the final fsync (which curl -o does not do): {unsynced / 1e6:.0f} MB/s = "
              f"{unsynced / curl_rate:.2f} x curl")
        print(f"  RSS {rss_start:.0f} MiB before; growth while downloading: sampled peak +{max(growth):.1f} MiB, "
              f"ru_maxrss +{maxrss_growth:.1f} MiB (target < {TARGET_RSS_MIB:g})   {c.verdict(peak < TARGET_RSS_MIB)}")
        return {"ratio": ratio, "rss_growth": peak, "curl": curl_rate, "ours": our_rate}
    finally:
        if server is not None:
            c.stop_process(server)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where both clients write (default: a temp dir)")
    parser.add_argument("--chunk-size", type=int, default=None, help="override download()'s chunk_size (bytes)")
    args = parser.parse_args(argv)
    run(args.size_mib << 20, args.rounds, args.dir, args.chunk_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
