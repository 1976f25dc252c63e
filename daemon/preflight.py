"""Check input VCFs before they are uploaded.

Cloudgene servers check their input rules only after the whole upload and a place in the queue, and then fail the
job. The rules (reference: cloudgene-api.md, "Input rules"): bgzip-compressed `*.vcf.gz`, one chromosome per file,
hg19 without the `chr` prefix and hg38 with it, the same samples in every file, 20–50,000 samples, about 5000 MB
per job. `preflight` checks all of them locally and reports every problem at once, each naming the file and what
to do about it.

Each file is read once, streaming, in constant memory: BGZF blocks are cut by their own length field and inflated
one by one (zlib also checks each block's CRC), lines are counted with `bytes.count`, and only the first column
of a record is looked at — a whole chunk of records on one chromosome is recognised without splitting it into
lines. The SHA-256 of the raw file is computed in the same pass.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: The 28-byte empty block that ends every BGZF file (SAM/BAM spec, 4.1.2).
BGZF_EOF = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")
#: Raw bytes read at a time.
READ_SIZE = 4 << 20
#: Decompressed bytes handed to the VCF reader at a time (bounds memory whatever the compression ratio).
FEED_SIZE = 8 << 20
BUILDS = {"hg19": False, "hg38": True}  # build -> whether CHROM carries the "chr" prefix
VCF_COLUMNS = ("#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO")
_GZIP_MAGIC = b"\x1f\x8b"
_OTHER_COMPRESSION = {
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"PK\x03\x04": "zip",
}
_MAX_LISTED = 5


@dataclass(frozen=True)
class InputInfo:
    """One input file that passed every check."""

    path: Path
    size: int
    sha256: str
    chromosome: str
    samples: int
    variants: int


class PreflightError(ValueError):
    """The inputs break the service's rules; `problems` lists every one, each naming its file."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{count} problem{'s' if count != 1 else ''} with the input files:\n{lines}")


def preflight(
    paths: Sequence[Path],
    *,
    build: str,
    min_samples: int = 20,
    max_samples: int = 50000,
    max_upload_bytes: int = 5000 * 1024**2,
) -> list[InputInfo]:
    """Check every input file and the set as a whole; return one `InputInfo` per file, in order, or raise
    `PreflightError` with every problem found (a file's problems come in the order the files were given, then
    the problems of the whole set)."""
    problems: list[str] = []
    if build not in BUILDS:
        problems.append(f"unknown build {build!r}; use hg19 or hg38")
    if not paths:
        problems.append("no input files given")

    scans: list[_Scan] = []
    seen_paths: dict[Path, str] = {}
    seen_names: dict[str, str] = {}
    for given in paths:
        path = Path(given)
        label = str(given)
        key = _identity(path)
        if key in seen_paths:
            problems.append(f"{label}: listed twice (also as {seen_paths[key]})")
            continue
        seen_paths[key] = label
        if path.name in seen_names:
            problems.append(
                f"{label}: same file name as {seen_names[path.name]}; the server stores uploads by name, rename one"
            )
        seen_names.setdefault(path.name, label)
        scan = _scan(path, label, build)
        problems.extend(scan.problems)
        scans.append(scan)

    _check_across(scans, problems, min_samples=min_samples, max_samples=max_samples)

    total = sum(scan.size for scan in scans)
    if total > max_upload_bytes:
        largest = sorted(scans, key=lambda scan: scan.size, reverse=True)
        files = _listing([f"{scan.label} {_human(scan.size)}" for scan in largest])
        problems.append(
            f"total upload {_human(total)} ({files}) exceeds the service limit of {max_upload_bytes // 1024**2} MB; "
            "submit the files as several jobs"
        )
    if problems:
        raise PreflightError(problems)
    return [
        InputInfo(
            path=scan.path,
            size=scan.size,
            sha256=scan.sha256,
            chromosome=next(iter(scan.chromosomes)),
            samples=len(scan.samples or ()),
            variants=scan.variants,
        )
        for scan in scans
    ]


# --- one file -----------------------------------------------------------------------------------------------------


@dataclass
class _Scan:
    path: Path
    label: str
    size: int = 0
    sha256: str = ""
    problems: list[str] = field(default_factory=list)
    #: None when the file could not be read as far as its #CHROM line.
    samples: list[str] | None = None
    chromosomes: dict[str, None] = field(default_factory=dict)  # an ordered set
    variants: int = 0

    def problem(self, text: str) -> None:
        self.problems.append(f"{self.label}: {text}")


def _identity(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:
        return path.absolute()


def _scan(path: Path, label: str, build: str) -> _Scan:
    scan = _Scan(path=path, label=label)
    if not path.name.endswith(".vcf.gz"):
        scan.problem("not named *.vcf.gz; the service accepts only bgzip-compressed VCF files named *.vcf.gz")
    try:
        st = path.stat()
    except FileNotFoundError:
        scan.problem("no such file")
        return scan
    except OSError as exc:
        scan.problem(f"cannot be read ({exc.strerror or exc}); check the path and its permissions")
        return scan
    if stat.S_ISDIR(st.st_mode):
        scan.problem("is a directory, not a VCF file")
        return scan
    if not stat.S_ISREG(st.st_mode):
        scan.problem("is not a regular file")  # a FIFO or device: opening it could block
        return scan
    try:
        fh = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below
    except OSError as exc:
        scan.problem(f"cannot be read ({exc.strerror or exc}); check its permissions")
        return scan
    with fh:
        try:
            _read(fh, scan, build)
        except OSError as exc:
            scan.problem(f"cannot be read ({exc.strerror or exc})")
    return scan


def _read(fh: io.FileIO, scan: _Scan, build: str) -> None:
    scan.size = os.fstat(fh.fileno()).st_size
    if scan.size == 0:
        scan.problem("is empty")
        return

    digest = hashlib.sha256()

    def raw_chunks() -> Iterator[bytes]:
        while chunk := fh.read(READ_SIZE):
            digest.update(chunk)
            yield chunk

    head = os.pread(fh.fileno(), 64, 0)
    tail = os.pread(fh.fileno(), len(BGZF_EOF), max(0, scan.size - len(BGZF_EOF)))
    vcf = _VcfReader(scan, build)
    if head.startswith(_GZIP_MAGIC):
        bgzf = _bgzf_block_size(head) is not None
        if bgzf:
            complete = _inflate_bgzf(raw_chunks(), vcf, scan)
            if complete and tail != BGZF_EOF:
                scan.problem(
                    "has no BGZF end-of-file marker, so it may be truncated; check the copy, "
                    "or recompress it with `bgzip` if it is complete"
                )
        else:
            scan.problem("not BGZF-compressed (plain gzip); recompress with `bgzip` (zcat FILE | bgzip > NEW.vcf.gz)")
            _inflate_gzip(raw_chunks(), vcf, scan)
    else:
        kind = next((name for magic, name in _OTHER_COMPRESSION.items() if head.startswith(magic)), None)
        if kind is not None:
            scan.problem(f"is {kind}-compressed; decompress it and compress with `bgzip` instead")
            return
        scan.problem("not compressed; compress it with `bgzip`")
        if not head.startswith(b"#"):
            return  # not a VCF either: reading it as text would only add noise
        for chunk in raw_chunks():
            vcf.feed(chunk)
        vcf.close()
    if scan.problems:
        return  # no InputInfo will be made: the hash is not needed
    for _ in raw_chunks():  # what the readers left unread (nothing, normally), so the hash covers the whole file
        pass
    scan.sha256 = digest.hexdigest()


def _bgzf_block_size(header: bytes | memoryview, pos: int = 0) -> int | None:
    """The total size of the BGZF block starting at `pos` (from its BC extra subfield), None when the gzip member
    there has no BC subfield (plain gzip), or -1 when the header is cut off."""
    if len(header) - pos < 12:
        return -1
    if header[pos] != 0x1F or header[pos + 1] != 0x8B or header[pos + 2] != 8 or not header[pos + 3] & 0x04:
        return None
    (xlen,) = struct.unpack_from("<H", header, pos + 10)
    if len(header) - pos < 12 + xlen:
        return -1
    sub = pos + 12
    end = sub + xlen
    while sub + 4 <= end:
        si1, si2, slen = header[sub], header[sub + 1], struct.unpack_from("<H", header, sub + 2)[0]
        if si1 == 66 and si2 == 67 and slen == 2 and sub + 6 <= end:
            block_size_minus_one: int = struct.unpack_from("<H", header, sub + 4)[0]
            return block_size_minus_one + 1
        sub += 4 + slen
    return None


def _inflate_bgzf(chunks: Iterator[bytes], vcf: _VcfReader, scan: _Scan) -> bool:
    """Inflate BGZF blocks one by one into `vcf`; False (with the problem recorded) when the file is not BGZF all
    through, has a damaged block or ends inside one."""
    pending = b""
    offset = 0  # of pending[0] in the file
    for chunk in chunks:
        buf = pending + chunk if pending else chunk
        view = memoryview(buf)
        pos = 0
        while True:
            size = _bgzf_block_size(view, pos)
            if size == -1 or (size is not None and pos + size > len(buf)):
                break  # the block continues in the next chunk
            if size is None:
                scan.problem(
                    f"not BGZF all through (the gzip member at byte {offset + pos} has no BGZF header); "
                    "recompress with `bgzip`"
                )
                return False
            try:
                data = zlib.decompress(view[pos : pos + size], 31)
            except zlib.error as exc:
                scan.problem(f"damaged compressed data at byte {offset + pos} ({exc}); re-copy or recompress it")
                return False
            pos += size
            vcf.feed(data)  # at most 64 KiB: fed block by block, no joining
        pending = buf[pos:]
        offset += pos
    if pending:
        scan.problem(f"truncated: the file ends inside a compressed block at byte {offset}; re-copy it")
        return False
    vcf.close()
    return True


def _inflate_gzip(chunks: Iterator[bytes], vcf: _VcfReader, scan: _Scan) -> None:
    """Plain (non-BGZF) gzip, possibly several members: only read on to report the file's other problems."""
    inflater = None
    limit = FEED_SIZE
    for chunk in chunks:
        data = chunk
        while data:
            if inflater is None:
                inflater = zlib.decompressobj(31)
            try:
                vcf.feed(inflater.decompress(data, limit))
            except zlib.error as exc:
                scan.problem(f"damaged compressed data ({exc})")
                return
            if inflater.eof:
                data = inflater.unused_data
                inflater = None
            else:
                data = inflater.unconsumed_tail
    if inflater is not None:
        try:
            vcf.feed(inflater.flush())
        except zlib.error as exc:
            scan.problem(f"damaged compressed data ({exc})")
            return
        if not inflater.eof:
            scan.problem("truncated gzip data: the file ends before its compressed stream does; re-copy it")
            return
    vcf.close()


class _VcfReader:
    """Consumes decompressed VCF text piece by piece (a BGZF block each): header checks, then for each record only
    its CHROM and the count.

    Pieces are scanned in place with offsets; nothing large is copied. A line cut between pieces is remembered by
    its start only (enough to hold CHROM and its tab), except for the first record, which is kept whole for its
    column count — so a file of very wide lines (50,000 samples) costs no more than one of narrow ones.
    """

    def __init__(self, scan: _Scan, build: str) -> None:
        self.scan = scan
        self.build = build
        self._in_header = True
        self._header_carry = b""
        self._first_line = True
        self._columns = 0
        self._checked_first_record = False
        #: the start of a record line that continues in the next piece (None when the last piece ended a line)
        self._partial: list[bytes] | None = None
        self._partial_has_tab = False
        #: the CHROM values seen, as bytes (the scan keeps them decoded, in order)
        self._seen: set[bytes] = set()
        #: b"20\t": CHROM of the latest record with its tab, for the fast path
        self._current = b""

    def feed(self, data: bytes) -> None:
        if not data:
            return
        start = 0
        if self._in_header:
            if self._header_carry:
                data = self._header_carry + data
                self._header_carry = b""
            start = self._header(data)
            # _header() may end the header; mypy keeps the narrowing of the `if` above across that call.
            if self._in_header or start >= len(data):  # type: ignore[unreachable]
                return
        if self._partial is not None:
            newline = data.find(b"\n", start)
            if newline < 0:
                self._extend_partial(data, start, len(data))
                return
            self._extend_partial(data, start, newline)
            line = b"".join(self._partial) + b"\n"
            self._partial = None
            self._records(line, 0, len(line))
            start = newline + 1
        cut = data.rfind(b"\n", start) + 1
        if cut > start:
            self._records(data, start, cut)
        else:
            cut = start
        if cut < len(data):
            self._partial = []
            self._partial_has_tab = False
            self._extend_partial(data, cut, len(data))

    def _extend_partial(self, data: bytes, start: int, end: int) -> None:
        assert self._partial is not None
        if not self._checked_first_record:
            self._partial.append(data[start:end])  # the first record is kept whole, for its column count
        elif not self._partial_has_tab:
            tab = data.find(b"\t", start, end)
            if tab >= 0:
                self._partial_has_tab = True
                end = tab + 1
            self._partial.append(data[start:end])

    def close(self) -> None:
        if self._in_header:
            if self._header_carry:
                carry, self._header_carry = self._header_carry, b""
                rest = carry + b"\n"
                start = self._header(rest)
                # _header() may end the header; mypy keeps the narrowing of the `if` above across that call.
                if not self._in_header and start < len(rest):  # type: ignore[unreachable]
                    self._records(rest, start, len(rest))  # type: ignore[unreachable]
            if self._in_header:
                if self._first_line:
                    self.scan.problem("holds no text")
                else:
                    self.scan.problem("no #CHROM header line; the header must end with #CHROM POS ID … FORMAT samples")
                return
        if self._partial is not None:
            line = b"".join(self._partial) + b"\n"
            self._partial = None
            self._records(line, 0, len(line))
        if self.scan.variants == 0:
            self.scan.problem("no variant records")
        self._report_chromosomes()

    # header ----------------------------------------------------------------------------------------------------

    def _header(self, data: bytes) -> int:
        """Consume header lines; return where the records start (len(data) with a cut-off header line kept)."""
        pos = 0
        while True:
            end = data.find(b"\n", pos)
            if end < 0:
                self._header_carry = data[pos:]
                return len(data)
            line = data[pos:end].rstrip(b"\r")
            if self._first_line:
                self._first_line = False
                if not line.startswith(b"##fileformat=VCF"):
                    self.scan.problem(
                        "##fileformat missing: the first line must be ##fileformat=VCFv4.x (is it a VCF file?)"
                    )
            if line.startswith(b"#") and not line.startswith(b"##"):
                self._chrom_line(line)
                self._in_header = False
                return end + 1
            if not line.startswith(b"#"):
                self.scan.problem("no #CHROM header line before the first record")
                self._in_header = False
                return pos
            pos = end + 1

    def _chrom_line(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        columns = text.split("\t")
        self._columns = len(columns)
        if tuple(columns[:8]) != VCF_COLUMNS or (len(columns) > 8 and columns[8] != "FORMAT"):
            shown = text[:80] + ("…" if len(text) > 80 else "")
            self.scan.problem(
                f"malformed #CHROM line {shown!r}; it must be tab-separated: "
                "#CHROM POS ID REF ALT QUAL FILTER INFO FORMAT sample…"
            )
        samples = columns[9:]
        self.scan.samples = samples
        if len(set(samples)) != len(samples):
            seen: set[str] = set()
            dups = {s for s in samples if s in seen or seen.add(s)}  # type: ignore[func-returns-value]
            self.scan.problem(
                f"duplicate sample names ({_listing(sorted(dups))}); make them unique (bcftools reheader)"
            )

    # records ---------------------------------------------------------------------------------------------------

    def _records(self, data: bytes, start: int, end: int) -> None:
        """`data[start:end]` holds whole lines, each ending with a newline."""
        if not self._checked_first_record:
            self._first_record(data, start, end)
        lines = data.count(b"\n", start, end)
        current = self._current
        if current and data.startswith(current, start) and data.count(b"\n" + current, start, end) + 1 == lines:
            self.scan.variants += lines  # all on the same chromosome: nothing else to look at
            return
        seen = self._seen
        last = None
        variants = 0
        for line in data[start:end].split(b"\n")[:-1]:
            if not line or line == b"\r" or line.startswith(b"#"):
                continue
            tab = line.find(b"\t")
            last = line[:tab] if tab >= 0 else line.rstrip(b"\r")
            variants += 1
            if last not in seen:
                self._add_chromosome(last)
        self.scan.variants += variants
        if last is not None:
            self._current = last + b"\t"

    def _first_record(self, data: bytes, start: int, end: int) -> None:
        pos = start
        while pos < end:
            newline = data.find(b"\n", pos, end)
            if newline < 0:
                newline = end
            line = data[pos:newline].rstrip(b"\r")
            pos = newline + 1
            if not line or line.startswith(b"#"):
                continue
            self._checked_first_record = True
            fields = line.count(b"\t") + 1
            if self._columns and fields != self._columns:
                self.scan.problem(
                    f"the first record has {fields} tab-separated columns but the #CHROM line has {self._columns}"
                )
            tab = line.find(b"\t")
            self._current = (line[:tab] if tab >= 0 else line) + b"\t"
            self._add_chromosome(self._current[:-1])
            return

    def _add_chromosome(self, name: bytes) -> None:
        if name not in self._seen:
            self._seen.add(name)
            self.scan.chromosomes[name.decode("utf-8", "replace")] = None

    def _report_chromosomes(self) -> None:
        names = list(self.scan.chromosomes)
        if len(names) > 1:
            self.scan.problem(
                f"contains chromosomes {_listing(names)}; split it into one file per chromosome "
                "(bcftools view -r CHROM)"
            )
        if self.build in BUILDS and names:
            want_prefix = BUILDS[self.build]
            wrong = [n for n in names if n.startswith("chr") != want_prefix]
            if wrong:
                expects = "expects the 'chr' prefix" if want_prefix else "expects no 'chr' prefix"
                self.scan.problem(
                    f"build {self.build} {expects} but CHROM is {wrong[0]!r}; "
                    "rename with `bcftools annotate --rename-chrs`, or check the build"
                )


# --- the set of files ---------------------------------------------------------------------------------------------


def _check_across(scans: list[_Scan], problems: list[str], *, min_samples: int, max_samples: int) -> None:
    reference: _Scan | None = None
    chromosome_owner: dict[str, str] = {}
    for scan in scans:
        if scan.samples is None:
            continue
        count = len(scan.samples)
        if not min_samples <= count <= max_samples:
            problems.append(f"{scan.label}: {count} samples; the service needs {min_samples}–{max_samples}")
        if reference is None:
            reference = scan
        else:
            ours, theirs = set(scan.samples), set(reference.samples or ())
            if ours != theirs:
                extra = sorted(ours - theirs)
                missing = sorted(theirs - ours)
                parts = []
                if extra:
                    parts.append(f"{len(extra)} not in {reference.label}: {_listing(extra)}")
                if missing:
                    parts.append(f"{len(missing)} missing here: {_listing(missing)}")
                problems.append(
                    f"{scan.label}: samples differ from {reference.label} ({'; '.join(parts)}); "
                    "every file needs the same samples (bcftools view -S)"
                )
        if len(scan.chromosomes) == 1:
            (chromosome,) = scan.chromosomes
            if chromosome in chromosome_owner:
                problems.append(
                    f"{scan.label}: chromosome {chromosome} is also in {chromosome_owner[chromosome]}; "
                    "each chromosome goes in one file (bcftools concat)"
                )
            else:
                chromosome_owner[chromosome] = scan.label


def _listing(items: Sequence[str]) -> str:
    shown = [str(i) for i in items[:_MAX_LISTED]]
    more = len(items) - len(shown)
    if more:
        return ", ".join(shown) + f" and {more} more"
    if len(shown) == 1:
        return shown[0]
    return ", ".join(shown[:-1]) + " and " + shown[-1]


def _human(size: int) -> str:
    for unit, factor in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} bytes"


__all__ = ["BGZF_EOF", "InputInfo", "PreflightError", "preflight"]
