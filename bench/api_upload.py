"""Upload: one big VCF through the API (`POST /api/v1/jobs`, multipart) against the same upload to a plain server,
both with `curl -F`, side by side.

    .venv/bin/python bench/api_upload.py                  # a 1 GiB VCF, 2 rounds
    .venv/bin/python bench/api_upload.py --size-mib 64 --rounds 1

The file is a valid BGZF VCF (50 samples, one chromosome) made fast: a block of records compressed once and written
again and again (the preflight reads every block and line but, like the server, only the first column of a record).
The plain server is cheroot with a WSGI function that streams the request body to a file and answers 201: the least
any server receiving the upload does. The API (`imputationd api`, its own process) streams the file part into the
job's upload folder, then preflights it as `imputationd submit` does (every BGZF block inflated and its lines
counted, the SHA-256 of the file) before it stores the job and answers.

Printed per round and as medians: seconds for the plain server, for the API, and for the preflight alone (in this
process, on the same file), so the API's time splits into receiving and checking. Targets: API <= 1.5 x (plain
upload + preflight alone), i.e. the API adds at most half to what receiving the file and checking it cost anyway;
the API process's RSS grows <= 64 MiB during the upload (the file is never held in memory).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

from daemon.preflight import preflight  # noqa: E402
from daemon.simulator.vcf import BGZF_EOF, BgzfWriter, sample_records, vcf_header  # noqa: E402

TARGET_RATIO = 1.5
TARGET_RSS_MIB = 64.0
SAMPLES = 50

PLAIN_SERVER = r'''
import sys
from cheroot import wsgi

target = sys.argv[2]

def app(environ, start_response):
    stream, left = environ["wsgi.input"], int(environ.get("CONTENT_LENGTH") or 0)
    with open(target, "wb") as out:
        while left > 0:
            chunk = stream.read(min(left, 1 << 20))
            if not chunk:
                break
            out.write(chunk)
            left -= len(chunk)
    start_response("201 Created", [("Content-Type", "application/json"), ("Content-Length", "2")])
    return [b"{}"]

wsgi.Server(("127.0.0.1", int(sys.argv[1])), app, numthreads=4).safe_start()
'''


def bgzf_bytes(text: str) -> bytes:
    """`text` as BGZF blocks, without the end-of-file block."""
    buffer = io.BytesIO()
    with BgzfWriter(buffer, level=6) as writer:
        writer.write(text.encode())
    return buffer.getvalue().removesuffix(BGZF_EOF)


def make_vcf(path: Path, size_mib: int) -> Path:
    names = [f"SAMPLE{n:05d}" for n in range(1, SAMPLES + 1)]
    records = sample_records("20", samples=SAMPLES, variants=20_000, seed=3, build="hg19")
    lines = [f"{r.chrom}\t{r.pos}\t{r.id}\t{r.ref}\t{r.alt}\t.\tPASS\t.\tGT\t" + "\t".join(r.genotypes)
             for r in records]
    body = bgzf_bytes("\n".join(lines) + "\n")
    with open(path, "wb") as out:
        out.write(bgzf_bytes(vcf_header(names, contigs=[("20", 64_444_167)])))
        while out.tell() < size_mib << 20:
            out.write(body)
        out.write(BGZF_EOF)
    return path


def wait_listening(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run(["curl", "-s", "-o", "/dev/null", url], check=False).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing answers at {url}")


def curl_upload(url: str, vcf: Path, headers: list[str]) -> tuple[float, int]:
    """Seconds for `curl -F` to send the file and read the answer; the HTTP status."""
    args = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-F", "service=sim", "-F", "panel=1000g-phase3",
            "-F", "build=hg19", "-F", f"file=@{vcf}", url]
    for header in headers:
        args[1:1] = ["-H", header]
    started = time.perf_counter()
    status = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - started, int(status)


def sampled_peak(pid: int, stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        out.append(c.rss_mb(pid))
        time.sleep(0.02)


def run(size_mib: int, rounds: int) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="imputationd-bench-upload-"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        started = time.perf_counter()
        vcf = make_vcf(root / "chr20.vcf.gz", size_mib)
        print(f"  {vcf.stat().st_size / 2**20:.0f} MiB VCF written in {time.perf_counter() - started:.1f} s",
              flush=True)
        db_url = f"sqlite:///{root / 'imputationd.db'}"
        engine = c.migrated_engine(db_url)
        from daemon.db.store import JobStore

        token = JobStore(engine).api_tokens.create("bench", "submit")[1]
        engine.dispose()
        (root / "token").write_text("bench-token\n")
        (root / "token").chmod(0o600)
        config = c.write_config(root / "config.yaml", state_dir=root / "state", db_url=db_url,
                                base_url="http://127.0.0.1:9", token_file=root / "token")
        api_port, plain_port = c.free_port(), c.free_port()
        with open(config, "a", encoding="utf-8") as file:
            file.write(f'api:\n  listen: "127.0.0.1:{api_port}"\n  max_upload_mb: {size_mib * 4}\n')
        command = Path(sys.executable).with_name("imputationd")
        log = open(root / "api.log", "wb")  # noqa: SIM115 - closed with the process
        api = subprocess.Popen([str(command), "api", "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
        plain = subprocess.Popen([sys.executable, "-c", PLAIN_SERVER, str(plain_port), str(root / "plain.bin")])
        processes += [api, plain]
        api_url, plain_url = f"http://127.0.0.1:{api_port}/api/v1/jobs", f"http://127.0.0.1:{plain_port}/"
        wait_listening(f"http://127.0.0.1:{api_port}/api/v1/openapi.json")
        wait_listening(plain_url)

        started = time.perf_counter()
        preflight([vcf], build="hg19", min_samples=20, max_samples=50_000, max_upload_bytes=size_mib << 22)
        checked = time.perf_counter() - started

        plain_s, api_s, growth = [], [], []
        for number in range(rounds):
            seconds, status = curl_upload(plain_url, vcf, [])
            assert status == 201, status
            plain_s.append(seconds)
            baseline = c.rss_mb(api.pid)
            samples: list[float] = []
            stop = threading.Event()
            sampler = threading.Thread(target=sampled_peak, args=(api.pid, stop, samples))
            sampler.start()
            try:
                seconds, status = curl_upload(api_url, vcf, [f"Authorization: Bearer {token}"])
            finally:
                stop.set()
                sampler.join()
            assert status == 201, (status, (root / "api.log").read_text()[-2000:])
            api_s.append(seconds)
            growth.append(max(samples, default=baseline) - baseline)
            print(f"  round {number + 1}: plain {plain_s[-1]:.2f} s, API {api_s[-1]:.2f} s "
                  f"(RSS +{growth[-1]:.1f} MiB)", flush=True)
            shutil.rmtree(root / "state" / "uploads", ignore_errors=True)  # keep the disk from filling up
        plain_m, api_m = statistics.median(plain_s), statistics.median(api_s)
        ratio, rss = api_m / (plain_m + checked), max(growth)
        c.banner(f"api_upload: a {size_mib} MiB VCF with curl -F, {rounds} rounds (medians)")
        print(f"  plain server: {plain_m:.2f} s ({size_mib / plain_m:.0f} MiB/s); preflight alone: {checked:.2f} s")
        print(f"  API: {api_m:.2f} s ({size_mib / api_m:.0f} MiB/s) = {api_m / plain_m:.2f} x the plain upload")
        print(f"  API / (plain + preflight) = {ratio:.2f} x   target <= {TARGET_RATIO:g}   "
              f"{c.verdict(ratio <= TARGET_RATIO)}")
        print(f"  API process RSS growth during the upload: {rss:.1f} MiB   target <= {TARGET_RSS_MIB:g} MiB   "
              f"{c.verdict(rss <= TARGET_RSS_MIB)}")
        return {"plain": plain_m, "api": api_m, "preflight": checked, "ratio": ratio, "rss_growth": rss}
    finally:
        for process in processes:
            c.stop_process(process)
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    print(json.dumps(run(args.size_mib, args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
