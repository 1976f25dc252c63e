"""`storage.extract`: unpack a completed job's verified chr_*.zip files into its result directory.

Each zip goes through `results.extract_zip` (member names checked, every entry's CRC — and for AES its HMAC —
checked while streaming, files 0640 and folders 0750, each renamed into place only when complete; a zip bomb, a zip
too big for the disk or one that would replace a downloaded file refused; symlinks not written). Unpacking is a
convenience on top of a job whose files are already downloaded and verified: a failure is logged and noted in the
reason of the job's `completed` event, and never fails the job. Running it again (the step was interrupted) rewrites
the same files.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import structlog

from daemon import results
from daemon.db.models import JobOutput
from daemon.states import OutputState
from daemon.text import counted

log = structlog.get_logger("daemon.unpack")

#: Result files that are unpacked: the per-chromosome zips of Cloudgene's imputation server.
ZIP_PATTERN = "chr_*.zip"


@dataclass
class Unpacked:
    zips: int = 0
    files: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A phrase for the job's history: what was unpacked, or what went wrong."""
        if not self.zips and not self.problems:
            return "no chr_*.zip to extract"
        text = f"extracted {counted(len(self.files), 'file')} from {counted(self.zips, 'zip')}"
        if self.problems:
            shown = "; ".join(self.problems[:3]) + (" …" if len(self.problems) > 3 else "")
            text += f"; extraction failed for {len(self.problems)}: {shown}"
        return text


def zips_to_unpack(outputs: Sequence[JobOutput]) -> list[JobOutput]:
    return [
        o for o in outputs
        if o.state is OutputState.VERIFIED and o.local_path and fnmatch.fnmatch(PurePosixPath(o.name).name, ZIP_PATTERN)
    ]


def unpack_outputs(
    outputs: Sequence[JobOutput],
    result_dir: Path,
    password: str | None,
    *,
    max_bytes: int | None = None,
    max_ratio: float | None = None,
) -> Unpacked:
    """Extract every verified chr_*.zip among `outputs` into `result_dir`; problems are collected, never raised.

    No zip may replace a verified download, nor unpack to more than `max_bytes` or `max_ratio` times its size
    (`storage.extract_max_gib`, `storage.extract_max_ratio`; see `results.extract_zip`)."""
    report = Unpacked()
    verified = [Path(o.local_path) for o in outputs if o.state is OutputState.VERIFIED and o.local_path]
    for output in zips_to_unpack(outputs):
        path = Path(output.local_path or "")
        try:
            written = results.extract_zip(path, result_dir, password, max_bytes=max_bytes, max_ratio=max_ratio,
                                          keep=verified)
        except results.CorruptResult as exc:
            problem = str(exc)
        except OSError as exc:
            problem = f"{path.name}: {exc.strerror or exc}"
        except Exception as exc:  # a bug must not turn a completed job into a step that crashes forever
            log.exception("extract_crashed", file=path.name, error_kind="extract")
            problem = f"{path.name}: internal error ({type(exc).__name__})"
        else:
            report.zips += 1
            report.files.extend(written)
            log.info("zip_extracted", file=path.name, files=len(written))
            continue
        report.problems.append(problem)
        log.error("extract_failed", file=path.name, reason=problem, error_kind="extract")
    return report


__all__ = ["ZIP_PATTERN", "Unpacked", "unpack_outputs", "zips_to_unpack"]
