"""Multipart uploads streamed to disk: each file part is written as it arrives into the request's own folder under
`storage.uploads_dir`, never held whole in memory; the folder becomes the job's inputs, or is removed when the
submission is refused."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import IO

from flask import Request
from werkzeug.exceptions import BadRequest
from werkzeug.utils import secure_filename

#: WSGI environ key of the folder the request's files are written to.
UPLOAD_DIR = "imputationd.upload_dir"


class UploadingRequest(Request):
    """A request whose file parts go straight into its upload folder (werkzeug calls this per file part)."""

    def _get_file_stream(self, total_content_length: int | None, content_type: str | None,
                         filename: str | None = None, content_length: int | None = None) -> IO[bytes]:
        folder = self.environ.get(UPLOAD_DIR)
        if folder is None:  # a route that takes no files: nothing may land on disk
            raise BadRequest("this route takes no file uploads")
        return open(_unique(Path(folder), filename), "xb")  # noqa: SIM115 - werkzeug closes it


def new_upload_dir(uploads_dir: Path) -> Path:
    folder = uploads_dir / uuid.uuid4().hex
    folder.mkdir(parents=True, mode=0o700)
    return folder


def uploaded_paths(request: Request) -> list[Path]:
    """The files of the request's `file` parts, in the order sent."""
    return [Path(part.stream.name) for part in request.files.getlist("file")]


def discard(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def _unique(folder: Path, filename: str | None) -> Path:
    """A safe name in `folder` for an uploaded file: its own name without any path (`../x` → `x`), numbered when
    two parts carry the same name."""
    name = secure_filename(filename or "") or "upload.vcf.gz"
    path = folder / name
    number = 1
    while path.exists():
        number += 1
        path = folder / f"{number}-{name}"
    return path
