"""The files a finished job offers for download, derived from its uploaded VCFs.

Not real imputation: every typed variant is carried over (phased, with dosages) and one "imputed" variant with
pseudo-random dosages and R2 is added after each, deterministically from the input, so the output changes when the
input does and has a plausible shape and size. Per chromosome: `chr_N.zip` holding `chrN.dose.vcf.gz` (BGZF),
`chrN.info.gz` (and `chrN.empiricalDose.vcf.gz` with `meta`), encrypted with the job password (ZipCrypto, or AES
through pyzipper with `aesEncryption`). Plus the QC reports and `statistics/…` text files.
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import hashlib
import html
import io
import random
import secrets
import string
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyzipper

from daemon.simulator.vcf import BgzfWriter, VcfRecord, VcfSummary, read_records
from daemon.simulator.zipcrypto import write_zipcrypto

_BASES = frozenset("ACGT")

#: (parameter id, label) of the job's download outputs, in the order the server lists them.
OUTPUT_PARAMS: tuple[tuple[str, str], ...] = (
    ("qcreport", "Quality-Control Report"),
    ("statistics", "QC Statistics"),
    ("output", "Imputation Results"),
)


@dataclass(frozen=True)
class JobParams:
    refpanel: str
    build: str
    r2_filter: float
    phasing: str
    population: str
    mode: str
    aes: bool
    meta: bool
    password: str
    password_generated: bool


@dataclass(frozen=True)
class ResultFile:
    param: str  #: output parameter id (see OUTPUT_PARAMS)
    name: str  #: download name; may contain a subfolder ("statistics/summary.txt")
    path: Path  #: where it is on disk
    size: int
    sha256: str


@dataclass
class ChromosomeStats:
    chromosome: str
    samples: int = 0
    typed: int = 0
    imputed: int = 0
    filtered_r2: int = 0
    excluded: list[tuple[int, str, str]] = field(default_factory=list)


def generate_password(length: int = 16) -> str:
    """What the server invents when no password was sent (and only e-mails to the user)."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def chromosome_number(chrom: str) -> str:
    return chrom.removeprefix("chr")


def input_summary_text(inputs: list[VcfSummary], params: JobParams) -> str:
    """The text of the "Input Validation" step, as imputationserver writes it."""
    samples = inputs[0].samples if inputs else []
    chroms = " ".join(chromosome_number(s.chromosomes[0]) for s in inputs if s.chromosomes)
    return "\n".join([
        f"{len(inputs)} valid VCF file(s) found.",
        "",
        f"Samples: {len(samples)}",
        f"Chromosomes: {chroms}",
        f"SNPs: {sum(s.variants for s in inputs)}",
        f"Chunks: {len(inputs)}",
        f"Datatype: {'phased' if inputs and all(s.phased for s in inputs) else 'unphased'}",
        f"Build: {params.build}",
        f"Reference Panel: {params.refpanel}",
        f"Population: {params.population}",
        f"Phasing: {params.phasing}",
        f"Mode: {params.mode}",
    ])


def qc_text(stats: list[ChromosomeStats], build: str) -> str:
    typed = sum(s.typed for s in stats)
    excluded = sum(len(s.excluded) for s in stats)
    return "\n".join([
        f"Uploaded data is {build} and reference is {build}.",
        "",
        "Statistics:",
        "Reference Overlap: 100.00 %",
        f"Match: {typed}",
        "Allele switch: 0",
        "Strand flip: 0",
        "Strand flip and allele switch: 0",
        "A/T, C/G genotypes: 0",
        "Filtered sites:",
        "Filter flag set: 0",
        f"Invalid alleles: {excluded}",
        "Multiallelic sites: 0",
        "Duplicated sites: 0",
        "NonSNP sites: 0",
        "Monomorphic sites: 0",
        "Allele mismatch: 0",
        "SNPs call rate < 90%: 0",
        "",
        f"Excluded sites in total: {excluded}",
        f"Remaining sites in total: {typed}",
    ])


class _Gz:
    """A deterministic (mtime 0) gzip text writer."""

    def __init__(self, path: Path) -> None:
        self._raw = open(path, "wb")  # noqa: SIM115
        self._gz = gzip.GzipFile(filename="", fileobj=self._raw, mode="wb", mtime=0)

    def write(self, data: bytes) -> None:
        self._gz.write(data)

    def close(self) -> None:
        self._gz.close()
        self._raw.close()


def _dose_header(samples: list[str], chrom: str, params: JobParams, *, empirical: bool) -> str:
    fmt = (
        ['##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotyped alleles">',
         '##FORMAT=<ID=LDS,Number=1,Type=Float,Description="Leave-one-out imputed dosage">']
        if empirical else
        ['##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">',
         '##FORMAT=<ID=DS,Number=1,Type=Float,Description="Estimated Alternate Allele Dosage : [P(0/1)+2*P(1/1)]">']
    )
    lines = [
        "##fileformat=VCFv4.1",
        "##source=Minimac4 (simulated by imputationd)",
        f"##phasing={'none' if params.phasing == 'no_phasing' else 'full'}",
        f"##contig=<ID={chrom}>",
        f"##imputationd_reference={params.refpanel}",
        '##INFO=<ID=AF,Number=1,Type=Float,Description="Estimated Alternate Allele Frequency">',
        '##INFO=<ID=MAF,Number=1,Type=Float,Description="Estimated Minor Allele Frequency">',
        '##INFO=<ID=R2,Number=1,Type=Float,Description="Estimated Imputation Accuracy (R-square)">',
        '##INFO=<ID=IMPUTED,Number=0,Type=Flag,Description="Marker was imputed">',
        '##INFO=<ID=TYPED,Number=0,Type=Flag,Description="Marker was genotyped">',
        *fmt,
        "\t".join(["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", "FORMAT", *samples]),
    ]
    return "\n".join(lines) + "\n"


def _typed_dosages(record: VcfRecord, phase: bool) -> tuple[list[str], list[int]]:
    gts, dosages = [], []
    for gt in record.genotypes:
        alleles = gt.replace("|", "/").split("/")
        a = [1 if x not in ("0", ".") else 0 for x in alleles[:2]] + [0, 0]
        dosages.append(a[0] + a[1])
        sep = "|" if phase or "|" in gt else "/"
        gts.append(f"{a[0]}{sep}{a[1]}")
    return gts, dosages


def _imputed(rng: random.Random, n: int, freq: float, r2: float) -> tuple[list[str], list[float]]:
    gts, dosages = [], []
    noise = (1.0 - r2) * 0.5
    for _ in range(n):
        a1, a2 = int(rng.random() < freq), int(rng.random() < freq)
        ds = min(2.0, max(0.0, a1 + a2 + rng.uniform(-noise, noise)))
        gts.append(f"{a1}|{a2}")
        dosages.append(ds)
    return gts, dosages


def _pairs(records: Iterator[tuple[list[str], VcfRecord]]) -> Iterator[tuple[list[str], VcfRecord, int | None]]:
    """Each record with the position of the next one."""
    prev: tuple[list[str], VcfRecord] | None = None
    for item in records:
        if prev is not None:
            yield prev[0], prev[1], item[1].pos
        prev = item
    if prev is not None:
        yield prev[0], prev[1], None


def _write_chromosome(
    src: Path, summary: VcfSummary, workdir: Path, params: JobParams
) -> tuple[list[Path], ChromosomeStats]:
    chrom = summary.chromosomes[0]
    number = chromosome_number(chrom)
    stats = ChromosomeStats(number, samples=len(summary.samples))
    rng = random.Random(f"{chrom}:{len(summary.samples)}:{summary.variants}:{params.refpanel}")
    dose_path = workdir / f"chr{number}.dose.vcf.gz"
    info_path = workdir / f"chr{number}.info.gz"
    emp_path = workdir / f"chr{number}.empiricalDose.vcf.gz"
    phase = params.phasing != "no_phasing"
    dose_raw = open(dose_path, "wb")  # noqa: SIM115
    emp_raw = open(emp_path, "wb") if params.meta else None  # noqa: SIM115
    dose = BgzfWriter(dose_raw)
    emp = BgzfWriter(emp_raw) if emp_raw else None
    info = _Gz(info_path)
    try:
        header_written = False
        info.write(b"SNP\tREF(0)\tALT(1)\tALT_Frq\tMAF\tAvgCall\tRsq\tGenotyped\tLooRsq\tEmpR\tEmpRsq\tDose0\tDose1\n")
        for samples, rec, next_pos in _pairs(read_records(src)):
            if not header_written:
                dose.write(_dose_header(samples, chrom, params, empirical=False).encode())
                if emp:
                    emp.write(_dose_header(samples, chrom, params, empirical=True).encode())
                header_written = True
            if rec.ref not in _BASES or rec.alt not in _BASES:
                stats.excluded.append((rec.pos, "Invalid Alleles", f"{chrom}:{rec.pos}:{rec.ref}:{rec.alt}"))
                continue
            n = max(len(rec.genotypes), 1)
            gts, ds = _typed_dosages(rec, phase)
            af = sum(ds) / (2 * n)
            maf = min(af, 1 - af)
            snp = f"{chrom}:{rec.pos}:{rec.ref}:{rec.alt}"
            lines = [f"{chrom}\t{rec.pos}\t{snp}\t{rec.ref}\t{rec.alt}\t.\tPASS\t"
                     f"AF={af:.5f};MAF={maf:.5f};R2=1.00000;TYPED\tGT:DS\t"
                     + "\t".join(f"{g}:{d}" for g, d in zip(gts, ds, strict=True))]
            info_lines = [f"{snp}\t{rec.ref}\t{rec.alt}\t{af:.5f}\t{maf:.5f}\t1.00000\t1.00000\tGenotyped"
                          f"\t1.00000\t1.00000\t1.00000\t-\t-"]
            stats.typed += 1
            if emp:
                emp.write((f"{chrom}\t{rec.pos}\t{snp}\t{rec.ref}\t{rec.alt}\t.\tPASS\tAF={af:.5f};TYPED\tGT:LDS\t"
                           + "\t".join(f"{g}:{d}" for g, d in zip(gts, ds, strict=True)) + "\n").encode())
            # one imputed marker between this typed marker and the next
            gap = (next_pos - rec.pos) if next_pos is not None else 1000
            if gap > 1:
                ipos = rec.pos + 1 + rng.randrange(gap - 1)
                iref, ialt = rng.sample("ACGT", 2)
                r2 = round(rng.uniform(0.05, 1.0), 5)
                freq = rng.uniform(0.001, 0.5)
                if r2 < params.r2_filter:
                    stats.filtered_r2 += 1
                else:
                    igts, ids = _imputed(rng, n, freq, r2)
                    iaf = sum(ids) / (2 * n)
                    isnp = f"{chrom}:{ipos}:{iref}:{ialt}"
                    lines.append(f"{chrom}\t{ipos}\t{isnp}\t{iref}\t{ialt}\t.\tPASS\t"
                                 f"AF={iaf:.5f};MAF={min(iaf, 1 - iaf):.5f};R2={r2:.5f};IMPUTED\tGT:DS\t"
                                 + "\t".join(f"{g}:{d:.3f}" for g, d in zip(igts, ids, strict=True)))
                    info_lines.append(f"{isnp}\t{iref}\t{ialt}\t{iaf:.5f}\t{min(iaf, 1 - iaf):.5f}\t"
                                      f"{0.5 + r2 / 2:.5f}\t{r2:.5f}\tImputed\t-\t-\t-\t-\t-")
                    stats.imputed += 1
            dose.write(("\n".join(lines) + "\n").encode())
            info.write(("\n".join(info_lines) + "\n").encode())
        if not header_written:
            dose.write(_dose_header(summary.samples, chrom, params, empirical=False).encode())
            if emp:
                emp.write(_dose_header(summary.samples, chrom, params, empirical=True).encode())
    finally:
        dose.close()
        dose_raw.close()
        if emp and emp_raw:
            emp.close()
            emp_raw.close()
        info.close()
    members = [dose_path, info_path] + ([emp_path] if params.meta else [])
    return members, stats


#: The dosage files of one chromosome by (the upload's SHA-256, the parameters but the password). The generator is
#: seeded from the input, so the same upload always gives the same dosages: a simulator fed one small test file a
#: thousand times (bench/throughput.py) builds them once and spends its CPU on what differs per job (the zip and
#: its password). Only small results are kept, and only the latest few.
_MEMBERS: OrderedDict[tuple[str, JobParams], tuple[list[tuple[str, bytes]], ChromosomeStats]] = OrderedDict()
_MEMBERS_KEPT = 16
_MEMBERS_MAX_BYTES = 1 << 20
_members_lock = threading.Lock()


def _chromosome_members(src: Path, summary: VcfSummary, workdir: Path, params: JobParams
                        ) -> tuple[list[Path], ChromosomeStats]:
    """`_write_chromosome`, or the files it wrote for the same upload and parameters before, written again."""
    key = (_sha256(src), dataclasses.replace(params, password="", password_generated=False))
    with _members_lock:
        known = _MEMBERS.get(key)
        if known is not None:
            _MEMBERS.move_to_end(key)
    if known is None:
        members, stats = _write_chromosome(src, summary, workdir, params)
        blobs = [(m.name, m.read_bytes()) for m in members]
        if sum(len(data) for _, data in blobs) <= _MEMBERS_MAX_BYTES:
            with _members_lock:
                _MEMBERS[key] = (blobs, copy.deepcopy(stats))
                while len(_MEMBERS) > _MEMBERS_KEPT:
                    _MEMBERS.popitem(last=False)
        return members, stats
    blobs, stats = known
    members = []
    for name, data in blobs:
        (workdir / name).write_bytes(data)
        members.append(workdir / name)
    return members, copy.deepcopy(stats)


def _zip(dest: Path, members: list[Path], params: JobParams) -> None:
    if params.aes:
        with pyzipper.AESZipFile(dest, "w", compression=pyzipper.ZIP_DEFLATED, encryption=pyzipper.WZ_AES) as zf:
            zf.setpassword(params.password.encode("utf-8"))
            zf.setencryption(pyzipper.WZ_AES, nbits=256)
            for m in members:
                zf.write(m, m.name)
    else:
        write_zipcrypto(dest, [(m.name, m) for m in members], params.password)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _qc_html(text: str, stats: list[ChromosomeStats]) -> str:
    rows = "\n".join(
        f"<tr><td>{html.escape(s.chromosome)}</td><td>{s.samples}</td><td>{s.typed}</td><td>{s.imputed}</td>"
        f"<td>{s.filtered_r2}</td><td>{len(s.excluded)}</td></tr>"
        for s in stats
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Quality-Control Report</title></head><body>\n"
        "<h1>Quality-Control Report</h1>\n"
        f"<pre>{html.escape(text)}</pre>\n"
        "<table><tr><th>Chromosome</th><th>Samples</th><th>Typed</th><th>Imputed</th><th>R2-filtered</th>"
        f"<th>Excluded</th></tr>\n{rows}\n</table>\n</body></html>\n"
    )


def build_results(
    outdir: Path, inputs: list[tuple[Path, VcfSummary]], params: JobParams
) -> tuple[list[ResultFile], str]:
    """Write every output of a job into `outdir`; return the files (with sizes and checksums) and the QC text."""
    outdir.mkdir(parents=True, exist_ok=True)
    scratch = outdir / ".scratch"
    scratch.mkdir(exist_ok=True)
    produced: list[tuple[str, str, Path]] = []
    all_stats: list[ChromosomeStats] = []
    for src, summary in sorted(inputs, key=lambda item: _chrom_order(item[1].chromosomes[0])):
        members, stats = _chromosome_members(src, summary, scratch, params)
        all_stats.append(stats)
        if params.mode != "qc_only":
            zpath = outdir / f"chr_{stats.chromosome}.zip"
            _zip(zpath, members, params)
            produced.append(("output", zpath.name, zpath))
            # imputationserver2 writes md5sum's line for each zip beside it.
            md5_path = zpath.with_name(zpath.name + ".md5")
            with open(zpath, "rb") as fh:  # streamed: a zip of a big input is not read into memory whole
                md5 = hashlib.file_digest(fh, "md5").hexdigest()
            md5_path.write_text(f"{md5}  {zpath.name}\n")
            produced.append(("output", md5_path.name, md5_path))
        for m in members:
            m.unlink()
    scratch.rmdir()
    text = qc_text(all_stats, params.build)
    report = outdir / "qc_report.txt"
    report.write_text(text + "\n")
    (outdir / "quality-control.html").write_text(_qc_html(text, all_stats))
    produced[:0] = [("qcreport", "quality-control.html", outdir / "quality-control.html"),
                    ("qcreport", "qc_report.txt", report)]
    statdir = outdir / "statistics"
    statdir.mkdir(exist_ok=True)
    buf = io.StringIO()
    buf.write("chromosome\tsamples\ttyped\timputed\tfiltered_r2\texcluded\n")
    for s in all_stats:
        buf.write(f"{s.chromosome}\t{s.samples}\t{s.typed}\t{s.imputed}\t{s.filtered_r2}\t{len(s.excluded)}\n")
    (statdir / "summary.txt").write_text(buf.getvalue())
    excluded = "#Position\tFilterType\tInfo\n" + "".join(
        f"{snp}\t{reason}\t-\n" for s in all_stats for _pos, reason, snp in s.excluded
    )
    (statdir / "snps-excluded.txt").write_text(excluded)
    produced += [("statistics", "statistics/summary.txt", statdir / "summary.txt"),
                 ("statistics", "statistics/snps-excluded.txt", statdir / "snps-excluded.txt")]
    files = [ResultFile(param, name, path, path.stat().st_size, _sha256(path)) for param, name, path in produced]
    return files, text


def _chrom_order(chrom: str) -> tuple[int, str]:
    n = chromosome_number(chrom)
    return (int(n), "") if n.isdigit() else (100, n)
