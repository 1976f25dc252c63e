"""BGZF-compressed VCF files: a writer for sample data and the minimal reading the simulated server needs.

BGZF (the bgzip format) is a series of gzip members, each at most 64 KiB compressed, whose header carries an extra
subfield `BC` holding the block size, followed by a fixed 28-byte empty block that marks the end of the file. Any
gzip reader reads it; imputation servers insist on it because they index the files.
"""

from __future__ import annotations

import gzip
import random
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

#: The BGZF end-of-file marker: an empty block (SAM/BAM specification, section 4.1.2).
BGZF_EOF = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")
#: Uncompressed bytes per block; keeps every compressed block under the 64 KiB limit even for random data.
_BLOCK_DATA = 0xFF00
_GZIP_MAGIC = b"\x1f\x8b"

CHROMOSOMES: tuple[str, ...] = tuple(str(n) for n in range(1, 23)) + ("X",)

#: Chromosome lengths, used for the `##contig` header and to keep sample positions in range.
CHROMOSOME_LENGTHS: dict[str, dict[str, int]] = {
    "hg19": dict(zip(CHROMOSOMES, (
        249250621, 243199373, 198022430, 191154276, 180915260, 171115067, 159138663, 146364022, 141213431,
        135534747, 135006516, 133851895, 115169878, 107349540, 102531392, 90354753, 81195210, 78077248, 59128983,
        63025520, 48129895, 51304566, 155270560,
    ), strict=True)),
    "hg38": dict(zip(CHROMOSOMES, (
        248956422, 242193529, 198295559, 190214555, 181538259, 170805979, 159345973, 145138636, 138394717,
        133797422, 135086622, 133275309, 114364328, 107043718, 101991189, 90338345, 83257441, 80373285, 58617616,
        64444167, 46709983, 50818468, 156040895,
    ), strict=True)),
}

MIN_SAMPLES = 20
MAX_SAMPLES = 50_000


# --------------------------------------------------------------------------------------------------- BGZF writing


def _bgzf_block(data: bytes, level: int) -> bytes:
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
    cdata = compressor.compress(data) + compressor.flush()
    # header (18) + cdata + crc32 (4) + isize (4); BSIZE is the total block size minus one
    bsize = 18 + len(cdata) + 8 - 1
    if bsize > 0xFFFF:  # cannot happen with _BLOCK_DATA, but never write a broken block
        raise ValueError("BGZF block too large")
    header = struct.pack("<4BI2BH2BHH", 0x1F, 0x8B, 8, 4, 0, 0, 0xFF, 6, ord("B"), ord("C"), 2, bsize)
    return header + cdata + struct.pack("<II", zlib.crc32(data) & 0xFFFFFFFF, len(data))


class BgzfWriter:
    """A binary file-like writer producing BGZF; `close()` writes the EOF block."""

    def __init__(self, fileobj: BinaryIO, *, level: int = 6) -> None:
        self._out = fileobj
        self._level = level
        self._buffer = bytearray()
        self.closed = False

    def write(self, data: bytes) -> int:
        self._buffer += data
        while len(self._buffer) >= _BLOCK_DATA:
            self._out.write(_bgzf_block(bytes(self._buffer[:_BLOCK_DATA]), self._level))
            del self._buffer[:_BLOCK_DATA]
        return len(data)

    def close(self) -> None:
        if self.closed:
            return
        if self._buffer:
            self._out.write(_bgzf_block(bytes(self._buffer), self._level))
            self._buffer.clear()
        self._out.write(BGZF_EOF)
        self.closed = True

    def __enter__(self) -> BgzfWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_bgzf(path: str | Path, *, level: int = 6) -> _BgzfFile:
    return _BgzfFile(Path(path), level)


class _BgzfFile(BgzfWriter):
    def __init__(self, path: Path, level: int) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        super().__init__(self._file, level=level)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._file.close()


def bgzf_blocks(path: str | Path) -> Iterator[tuple[int, int]]:
    """Yield (offset, block size) of every BGZF block; raises ValueError at the first thing that is not one."""
    with open(path, "rb") as f:
        offset = 0
        while True:
            header = f.read(18)
            if not header:
                return
            if len(header) < 18 or header[:4] != b"\x1f\x8b\x08\x04":
                raise ValueError(f"no BGZF block header at offset {offset}")
            xlen = struct.unpack("<H", header[10:12])[0]
            extra = header[12:18] + f.read(xlen - 6) if xlen >= 6 else b""
            bsize = None
            pos = 0
            while pos + 4 <= len(extra):
                si1, si2, slen = extra[pos], extra[pos + 1], struct.unpack("<H", extra[pos + 2 : pos + 4])[0]
                if si1 == ord("B") and si2 == ord("C") and slen == 2:
                    bsize = struct.unpack("<H", extra[pos + 4 : pos + 6])[0] + 1
                pos += 4 + slen
            if bsize is None:
                raise ValueError(f"gzip member at offset {offset} has no BC subfield")
            consumed = 12 + xlen
            f.seek(bsize - consumed, 1)
            yield offset, bsize
            offset += bsize


def looks_like_bgzf(path: str | Path) -> bool:
    """The check a server makes before reading: the first gzip member carries the BGZF `BC` subfield."""
    with open(path, "rb") as f:
        head = f.read(18)
    return (
        len(head) == 18
        and head[:4] == b"\x1f\x8b\x08\x04"
        and struct.unpack("<H", head[10:12])[0] >= 6
        and head[12:14] == b"BC"
        and struct.unpack("<H", head[14:16])[0] == 2
    )


def has_bgzf_eof(path: str | Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, 2)
        if f.tell() < len(BGZF_EOF):
            return False
        f.seek(-len(BGZF_EOF), 2)
        return f.read() == BGZF_EOF


# ---------------------------------------------------------------------------------------------------- VCF writing


@dataclass(frozen=True)
class VcfRecord:
    chrom: str
    pos: int
    id: str
    ref: str
    alt: str
    genotypes: tuple[str, ...]


def chromosome_label(chromosome: str, build: str) -> str:
    """'20' in hg19, 'chr20' in hg38, whichever way `chromosome` was spelled."""
    bare = chromosome.removeprefix("chr")
    return f"chr{bare}" if build == "hg38" else bare


def sample_records(
    chrom: str, *, samples: int, variants: int, seed: int = 0, build: str = "hg19", phased: bool = False
) -> Iterator[VcfRecord]:
    """Deterministic, plausible biallelic SNPs on `chrom` (spelled as given)."""
    rng = random.Random(f"{chrom}:{build}:{samples}:{variants}:{seed}")
    length = CHROMOSOME_LENGTHS.get(build, CHROMOSOME_LENGTHS["hg19"]).get(chrom.removeprefix("chr"), 50_000_000)
    max_step = max(2, min(5000, (length - 200_000) // max(variants, 1)))
    pos = 60_000 + rng.randrange(1000)
    sep = "|" if phased else "/"
    for _ in range(variants):
        pos += rng.randrange(1, max_step)
        ref, alt = rng.sample("ACGT", 2)
        freq = rng.uniform(0.02, 0.6)
        gts = tuple(
            f"{int(rng.random() < freq)}{sep}{int(rng.random() < freq)}" for _ in range(samples)
        )
        yield VcfRecord(chrom, pos, f"rs{rng.randrange(10**6, 10**9)}", ref, alt, gts)


def vcf_header(samples: Iterable[str], *, contigs: Iterable[tuple[str, int]] = (), source: str = "imputationd") -> str:
    lines = ["##fileformat=VCFv4.2", f"##source={source}"]
    lines += [f"##contig=<ID={name},length={length}>" for name, length in contigs]
    lines.append('##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">')
    lines.append("\t".join(["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", "FORMAT", *samples]))
    return "\n".join(lines) + "\n"


def write_vcf(
    path: str | Path,
    *,
    samples: list[str],
    records: Iterable[VcfRecord],
    compression: str = "bgzf",
    contigs: Iterable[tuple[str, int]] = (),
) -> Path:
    """Write a VCF with `compression` "bgzf" (valid for servers), "gzip" (plain gzip, which servers reject) or
    "none"."""
    path = Path(path)
    if compression == "bgzf":
        out: BinaryIO = open_bgzf(path)  # type: ignore[assignment]
    elif compression == "gzip":
        out = gzip.open(path, "wb")  # type: ignore[assignment]
    elif compression == "none":
        out = open(path, "wb")  # noqa: SIM115
    else:
        raise ValueError(f"unknown compression {compression!r}")
    try:
        out.write(vcf_header(samples, contigs=contigs).encode())
        chunk: list[str] = []
        for r in records:
            chunk.append(f"{r.chrom}\t{r.pos}\t{r.id}\t{r.ref}\t{r.alt}\t.\tPASS\t.\tGT\t" + "\t".join(r.genotypes))
            if len(chunk) >= 1000:
                out.write(("\n".join(chunk) + "\n").encode())
                chunk.clear()
        if chunk:
            out.write(("\n".join(chunk) + "\n").encode())
    finally:
        out.close()
    return path


def write_sample_vcf(
    path: str | Path,
    *,
    chromosome: str = "20",
    build: str = "hg19",
    samples: int = 25,
    variants: int = 200,
    seed: int = 0,
) -> Path:
    """Write a valid BGZF-compressed VCF for one chromosome, encoded the way `build` wants it (`chr` prefix on hg38)."""
    if build not in CHROMOSOME_LENGTHS:
        raise ValueError(f"unknown build {build!r}")
    chrom = chromosome_label(chromosome, build)
    length = CHROMOSOME_LENGTHS[build].get(chrom.removeprefix("chr"), 50_000_000)
    names = [f"SAMPLE{n:05d}" for n in range(1, samples + 1)]
    return write_vcf(
        path,
        samples=names,
        records=sample_records(chrom, samples=samples, variants=variants, seed=seed, build=build),
        contigs=[(chrom, length)],
    )


# ---------------------------------------------------------------------------------------------------- VCF reading


@dataclass
class VcfSummary:
    """What the server learns about one uploaded file while validating it."""

    filename: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    chromosomes: list[str] = field(default_factory=list)
    variants: int = 0
    phased: bool = False

    @property
    def chromosome(self) -> str | None:
        return self.chromosomes[0] if len(self.chromosomes) == 1 else None


def read_records(path: str | Path) -> Iterator[tuple[list[str], VcfRecord]]:
    """Yield (samples, record) from a (b)gzipped VCF; the caller has validated it with `inspect_vcf`."""
    samples: list[str] = []
    with gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="\n") as f:
        for line in f:
            if line.startswith("##"):
                continue
            line = line.rstrip("\r\n")
            if line.startswith("#"):
                samples = line.split("\t")[9:]
                continue
            if not line:
                continue
            cols = line.split("\t")
            gts = tuple(c.split(":", 1)[0] for c in cols[9:])
            yield samples, VcfRecord(cols[0], int(cols[1]), cols[2], cols[3], cols[4], gts)


def inspect_vcf(path: str | Path, filename: str, *, max_errors: int = 5) -> VcfSummary:
    """Check one upload the way imputationserver's input validation does, without holding it in memory."""
    summary = VcfSummary(filename)
    path = Path(path)
    if not filename.endswith(".vcf.gz"):
        summary.errors.append(f"File '{filename}' is not a bgzip-compressed VCF file (*.vcf.gz).")
        return summary
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic != _GZIP_MAGIC:
        summary.errors.append(f"File '{filename}' is not a valid bgzip-compressed VCF file.")
        return summary
    if not looks_like_bgzf(path):
        summary.errors.append(
            f"File '{filename}' is not BGZF compressed. Please compress it with bgzip (htslib), not gzip."
        )
        return summary
    if not has_bgzf_eof(path):
        summary.warnings.append(f"File '{filename}' has no BGZF end-of-file marker; it may be truncated.")
    chroms: dict[str, None] = {}
    header_seen = False
    try:
        with gzip.open(path, "rt", encoding="utf-8", errors="strict", newline="\n") as f:
            for lineno, line in enumerate(f, 1):
                if line.startswith("##"):
                    continue
                line = line.rstrip("\r\n")
                if line.startswith("#"):
                    cols = line.split("\t")
                    if cols[:8] != ["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO"]:
                        summary.errors.append(f"File '{filename}': malformed VCF header line (line {lineno}).")
                        return summary
                    summary.samples = cols[9:]
                    header_seen = True
                    continue
                if not line:
                    continue
                if not header_seen:
                    summary.errors.append(f"File '{filename}': no #CHROM header line before the data.")
                    return summary
                cols = line.split("\t", 9)
                if len(cols) < 10 or not cols[1].isdigit():
                    summary.errors.append(f"File '{filename}': malformed data line {lineno}.")
                    if len(summary.errors) >= max_errors:
                        return summary
                    continue
                if cols[0] not in chroms:
                    chroms[cols[0]] = None
                summary.variants += 1
                if summary.variants == 1:
                    summary.phased = "|" in cols[9].split("\t", 1)[0]
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        summary.errors.append(f"File '{filename}' could not be read: {exc.__class__.__name__}.")
        return summary
    summary.chromosomes = list(chroms)
    if not header_seen:
        summary.errors.append(f"File '{filename}' is not a VCF file: no #CHROM header line.")
    elif summary.variants == 0:
        summary.errors.append(f"File '{filename}' contains no variants.")
    return summary
