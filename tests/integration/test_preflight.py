"""Input checks before upload: every kind of bad VCF, reported all at once with its file name."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from pathlib import Path

import pytest

from daemon import preflight as pf
from daemon.preflight import BGZF_EOF, InputInfo, PreflightError, preflight

# --- a tiny BGZF writer ---------------------------------------------------------------------------------------------

BLOCK = 0xFF00  # bgzip's uncompressed block size


def bgzf_block(data: bytes) -> bytes:
    """One BGZF block: a gzip member with the BC extra subfield holding the block size - 1."""
    deflater = zlib.compressobj(6, zlib.DEFLATED, -15)
    payload = deflater.compress(data) + deflater.flush()
    header = struct.pack("<4BI2BH", 0x1F, 0x8B, 8, 4, 0, 0, 0xFF, 6) + b"BC" + struct.pack("<2H", 2, 0)
    size = len(header) + len(payload) + 8
    header = header[:-2] + struct.pack("<H", size - 1)
    return header + payload + struct.pack("<2I", zlib.crc32(data), len(data))


def bgzip(data: bytes, *, eof: bool = True, block: int = BLOCK) -> bytes:
    blocks = [bgzf_block(data[i : i + block]) for i in range(0, len(data), block)]
    return b"".join(blocks) + (BGZF_EOF if eof else b"")


def test_writer_makes_the_standard_eof_block_and_readable_output() -> None:
    assert bgzf_block(b"") == BGZF_EOF
    data = b"hello\n" * 50000
    assert gzip.decompress(bgzip(data)) == data


def vcf_text(
    *,
    chrom: str | list[str] = "20",
    samples: int | list[str] = 25,
    records: int = 10,
    fileformat: bool = True,
    header: bool = True,
) -> bytes:
    names = samples if isinstance(samples, list) else [f"S{i}" for i in range(samples)]
    lines = []
    if fileformat:
        lines.append("##fileformat=VCFv4.2")
    lines.append('##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">')
    if header:
        lines.append("\t".join(["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", "FORMAT", *names]))
    chroms = chrom if isinstance(chrom, list) else [chrom]
    for c in chroms:
        for i in range(records):
            lines.append("\t".join([c, str(1000 + i), ".", "A", "G", ".", "PASS", ".", "GT", *["0|1"] * len(names)]))
    return ("\n".join(lines) + "\n").encode()


def write_vcf(path: Path, data: bytes | None = None, *, eof: bool = True, block: int = BLOCK, **kwargs) -> Path:  # noqa: ANN003
    path.write_bytes(bgzip(vcf_text(**kwargs) if data is None else data, eof=eof, block=block))
    return path


def problems_of(paths, build: str = "hg19", **kwargs) -> list[str]:  # noqa: ANN001, ANN003
    with pytest.raises(PreflightError) as info:
        preflight(paths, build=build, **kwargs)
    return info.value.problems


def one_problem(paths, build: str = "hg19", **kwargs) -> str:  # noqa: ANN001, ANN003
    problems = problems_of(paths, build, **kwargs)
    assert len(problems) == 1, problems
    return problems[0]


# --- good input -----------------------------------------------------------------------------------------------------


def test_good_files_give_their_facts(tmp_path: Path) -> None:
    a = write_vcf(tmp_path / "chr20.vcf.gz", chrom="20", records=7)
    b = write_vcf(tmp_path / "chr21.vcf.gz", chrom="21", records=3)
    infos = preflight([a, b], build="hg19")
    assert infos[0] == InputInfo(
        path=a,
        size=a.stat().st_size,
        sha256=hashlib.sha256(a.read_bytes()).hexdigest(),
        chromosome="20",
        samples=25,
        variants=7,
    )
    assert (infos[1].chromosome, infos[1].variants) == ("21", 3)


def test_hg38_with_chr_prefix(tmp_path: Path) -> None:
    a = write_vcf(tmp_path / "a.vcf.gz", chrom="chr20")
    assert preflight([a], build="hg38")[0].chromosome == "chr20"


def test_records_spanning_many_blocks_and_reads_are_counted(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(pf, "READ_SIZE", 1000)  # blocks and lines cut across reads
    a = write_vcf(tmp_path / "a.vcf.gz", data=vcf_text(records=5000, samples=30), block=777)
    info = preflight([a], build="hg19")[0]
    assert (info.variants, info.samples) == (5000, 30)
    assert info.sha256 == hashlib.sha256(a.read_bytes()).hexdigest()


def test_crlf_and_blank_lines_and_no_final_newline(tmp_path: Path) -> None:
    text = vcf_text(records=4).replace(b"\n", b"\r\n") + b"\r\n" + b"20\t9\t.\tA\tG\t.\tPASS\t.\tGT" + b"\t0|0" * 25
    a = write_vcf(tmp_path / "a.vcf.gz", data=text)
    info = preflight([a], build="hg19")[0]
    assert (info.variants, info.samples, info.chromosome) == (5, 25, "20")


# --- each bad kind --------------------------------------------------------------------------------------------------


def test_plain_gzip_is_not_bgzf(tmp_path: Path) -> None:
    a = tmp_path / "chr20.vcf.gz"
    a.write_bytes(gzip.compress(vcf_text()))
    problem = one_problem([a])
    assert problem.startswith(f"{a}: not BGZF-compressed (plain gzip)")
    assert "bgzip" in problem


def test_plain_gzip_is_still_read_for_other_problems(tmp_path: Path) -> None:
    a = tmp_path / "chr20.vcf.gz"
    a.write_bytes(gzip.compress(vcf_text(chrom=["20", "21"])))
    problems = problems_of([a])
    assert any("plain gzip" in p for p in problems)
    assert any("chromosomes 20 and 21" in p for p in problems)


def test_uncompressed_and_other_compressions(tmp_path: Path) -> None:
    plain = tmp_path / "plain.vcf.gz"
    plain.write_bytes(vcf_text(samples=3))
    xz = tmp_path / "x.vcf.gz"
    xz.write_bytes(b"\xfd7zXZ\x00rest")
    problems = problems_of([plain, xz])
    assert f"{plain}: not compressed; compress it with `bgzip`" in problems
    assert f"{plain}: 3 samples; the service needs 20–50000" in problems  # read as text for the rest
    assert any(p.startswith(f"{xz}: is xz-compressed") for p in problems)


def test_two_chromosomes_in_one_file(tmp_path: Path) -> None:
    a = write_vcf(tmp_path / "a.vcf.gz", chrom=["20", "21"])
    assert one_problem([a]) == (
        f"{a}: contains chromosomes 20 and 21; split it into one file per chromosome (bcftools view -r CHROM)"
    )


def test_chromosome_change_late_in_a_large_file_is_found(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(pf, "READ_SIZE", 4096)
    last_x_record = vcf_text(chrom="X", records=1).split(b"\n")[-2]
    a = write_vcf(tmp_path / "a.vcf.gz", data=vcf_text(records=3000) + last_x_record + b"\n")
    assert "chromosomes 20 and X" in one_problem([a])


def test_build_prefix_rules(tmp_path: Path) -> None:
    a = write_vcf(tmp_path / "a.vcf.gz", chrom="20")
    b = write_vcf(tmp_path / "b.vcf.gz", chrom="chr21")
    assert one_problem([a], build="hg38").startswith(f"{a}: build hg38 expects the 'chr' prefix but CHROM is '20'")
    assert one_problem([b], build="hg19").startswith(f"{b}: build hg19 expects no 'chr' prefix but CHROM is 'chr21'")
    assert one_problem([a], build="hg37") == "unknown build 'hg37'; use hg19 or hg38"


def test_samples_must_match_across_files(tmp_path: Path) -> None:
    names = [f"S{i}" for i in range(25)]
    a = write_vcf(tmp_path / "a.vcf.gz", chrom="20", samples=names)
    b = write_vcf(tmp_path / "b.vcf.gz", chrom="21", samples=[*names[:-1], "Other"])
    c = write_vcf(tmp_path / "c.vcf.gz", chrom="22", samples=list(reversed(names)))  # order alone is fine
    problem = one_problem([a, b, c])
    assert problem.startswith(f"{b}: samples differ from {a} (1 not in {a}: Other; 1 missing here: S24)")


def test_sample_count_limits(tmp_path: Path) -> None:
    a = write_vcf(tmp_path / "a.vcf.gz", samples=12)
    assert one_problem([a]) == f"{a}: 12 samples; the service needs 20–50000"
    assert preflight([a], build="hg19", min_samples=10)[0].samples == 12
    assert "the service needs 1–10" in one_problem([a], min_samples=1, max_samples=10)


def test_total_upload_limit(tmp_path: Path) -> None:
    a = write_vcf(tmp_path / "a.vcf.gz")
    size = a.stat().st_size
    assert one_problem([a], max_upload_bytes=size - 1).startswith("total upload ")
    message = one_problem([a], max_upload_bytes=size - 1)
    assert message.endswith("exceeds the service limit of 0 MB; submit the files as several jobs")
    assert pf._human(int(6.1 * 1024**3)) == "6.1 GB"


def test_missing_empty_directory_and_wrong_name(tmp_path: Path) -> None:
    missing = tmp_path / "missing.vcf.gz"
    empty = tmp_path / "empty.vcf.gz"
    empty.write_bytes(b"")
    folder = tmp_path / "dir.vcf.gz"
    folder.mkdir()
    wrong = write_vcf(tmp_path / "chr20.vcf")
    problems = problems_of([missing, empty, folder, wrong])
    assert problems == [
        f"{missing}: no such file",
        f"{empty}: is empty",
        f"{folder}: is a directory, not a VCF file",
        f"{wrong}: not named *.vcf.gz; the service accepts only bgzip-compressed VCF files named *.vcf.gz",
    ]


def test_fifo_is_not_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "f.vcf.gz"
    os.mkfifo(fifo)
    assert one_problem([fifo]) == f"{fifo}: is not a regular file"


def test_unreadable(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    a = write_vcf(tmp_path / "a.vcf.gz")

    def denied(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pf, "open", denied, raising=False)
    assert one_problem([a]) == f"{a}: cannot be read (Permission denied); check its permissions"


def test_truncated_file(tmp_path: Path) -> None:
    good = bgzip(vcf_text(records=2000))
    a = tmp_path / "a.vcf.gz"
    a.write_bytes(good[: len(good) // 2])
    problem = one_problem([a])
    assert problem.startswith(f"{a}: truncated: the file ends inside a compressed block")


def test_truncated_plain_gzip(tmp_path: Path) -> None:
    data = gzip.compress(vcf_text(records=2000))
    a = tmp_path / "a.vcf.gz"
    a.write_bytes(data[: len(data) // 2])
    problems = problems_of([a])
    assert any("plain gzip" in p for p in problems)
    assert any(p.startswith(f"{a}: truncated gzip data") for p in problems)


def test_missing_eof_marker(tmp_path: Path) -> None:
    a = write_vcf(tmp_path / "a.vcf.gz", data=vcf_text(), eof=False)
    problem = one_problem([a])
    assert problem.startswith(f"{a}: has no BGZF end-of-file marker, so it may be truncated")


def test_damaged_block(tmp_path: Path) -> None:
    data = bytearray(bgzip(vcf_text(records=50)))
    data[40] ^= 0xFF
    a = tmp_path / "a.vcf.gz"
    a.write_bytes(bytes(data))
    assert one_problem([a]).startswith(f"{a}: damaged compressed data at byte 0")


def test_gzip_member_without_bgzf_header_midway(tmp_path: Path) -> None:
    a = tmp_path / "a.vcf.gz"
    a.write_bytes(bgzf_block(vcf_text(records=1)) + gzip.compress(b"20\t5\n") + BGZF_EOF)
    assert "not BGZF all through" in one_problem([a])


def test_no_chrom_header_and_no_fileformat(tmp_path: Path) -> None:
    a = write_vcf(tmp_path / "a.vcf.gz", header=False)
    b = write_vcf(tmp_path / "b.vcf.gz", fileformat=False)
    problems = problems_of([a, b])
    assert f"{a}: no #CHROM header line before the first record" in problems
    assert any(p.startswith(f"{b}: ##fileformat missing") for p in problems)
    assert len(problems) == 2, problems


def test_header_only_file(tmp_path: Path) -> None:
    a = write_vcf(tmp_path / "a.vcf.gz", records=0)
    assert one_problem([a]) == f"{a}: no variant records"


def test_malformed_chrom_line_and_column_count(tmp_path: Path) -> None:
    text = vcf_text().replace(b"#CHROM\tPOS", b"#CHROM POS")
    a = write_vcf(tmp_path / "a.vcf.gz", data=text)
    problems = problems_of([a])
    assert any("malformed #CHROM line" in p for p in problems)
    assert any("the first record has 34 tab-separated columns but the #CHROM line has 33" in p for p in problems)


def test_duplicate_samples(tmp_path: Path) -> None:
    a = write_vcf(tmp_path / "a.vcf.gz", samples=[f"S{i % 20}" for i in range(22)])
    assert one_problem([a]) == f"{a}: duplicate sample names (S0 and S1); make them unique (bcftools reheader)"


def test_same_chromosome_twice_and_same_file_twice(tmp_path: Path) -> None:
    a = write_vcf(tmp_path / "a.vcf.gz", chrom="20")
    (tmp_path / "sub").mkdir()
    b = write_vcf(tmp_path / "sub" / "b.vcf.gz", chrom="20")
    problems = problems_of([a, b, a])
    assert problems == [
        f"{a}: listed twice (also as {a})",
        f"{b}: chromosome 20 is also in {a}; each chromosome goes in one file (bcftools concat)",
    ]


def test_same_file_name_in_two_folders(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a = write_vcf(tmp_path / "x" / "chr.vcf.gz", chrom="20")
    b = write_vcf(tmp_path / "y" / "chr.vcf.gz", chrom="21")
    assert one_problem([a, b]).startswith(f"{b}: same file name as {a}")


def test_every_problem_is_reported_with_its_file(tmp_path: Path) -> None:
    plain = tmp_path / "plain.vcf.gz"
    plain.write_bytes(gzip.compress(vcf_text(chrom="20")))
    multi = write_vcf(tmp_path / "multi.vcf.gz", chrom=["21", "22"])
    few = write_vcf(tmp_path / "few.vcf.gz", chrom="X", samples=5)
    missing = tmp_path / "missing.vcf.gz"
    with pytest.raises(PreflightError) as info:
        preflight([plain, multi, few, missing], build="hg38", max_upload_bytes=10)
    problems = info.value.problems
    assert len(problems) == 9, problems
    for path in (plain, multi, few, missing):
        assert any(p.startswith(f"{path}: ") for p in problems), path
    assert problems[-1].startswith("total upload ")
    assert str(info.value).startswith("9 problems with the input files:\n  - ")


def test_constant_memory_reader_handles_a_large_file(tmp_path: Path) -> None:
    """About 40 MB of VCF text: the reader must not hold it all (checked loosely via tracemalloc)."""
    import tracemalloc

    a = tmp_path / "big.vcf.gz"
    record = "\t".join(["20", "1", ".", "A", "G", ".", "PASS", ".", "GT", *["0|0"] * 25]) + "\n"
    chunk = record.encode() * 4000
    with open(a, "wb") as out:
        out.write(bgzip(vcf_text(records=0)[:-1] + b"\n", eof=False))
        for _ in range(100):
            out.write(bgzip(chunk, eof=False))
        out.write(BGZF_EOF)
    tracemalloc.start()
    try:
        info = preflight([a], build="hg19")[0]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.variants == 400_000
    assert peak < 64 * 1024**2


def test_wide_lines_spanning_many_blocks(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(pf, "READ_SIZE", 3000)
    text = vcf_text(samples=3000, records=20) + vcf_text(chrom="21", samples=3000, records=1).rsplit(b"\n", 2)[-2]
    a = write_vcf(tmp_path / "a.vcf.gz", data=text, block=500)  # every line spans ~25 blocks; no final newline
    assert one_problem([a]) == (
        f"{a}: contains chromosomes 20 and 21; split it into one file per chromosome (bcftools view -r CHROM)"
    )
    b = write_vcf(tmp_path / "b.vcf.gz", samples=3000, records=20, block=500)
    info = preflight([b], build="hg19")[0]
    assert (info.variants, info.samples) == (20, 3000)
    short_first_record = vcf_text(samples=3000, records=3).replace(b"\t0|1\n", b"\n", 1)
    c = write_vcf(tmp_path / "c.vcf.gz", data=short_first_record, block=500)
    assert "the first record has 3008 tab-separated columns but the #CHROM line has 3009" in one_problem([c])
