"""``sdmaker s3 cp``: copy files and folders to, from and between S3 locations."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdmaker.cli._common import console, get_settings, setup_logging
from sdmaker.cli._model import byte_progress

__all__ = ["register"]

s3_app = typer.Typer(help="S3 transfers with the standard AWS configuration (AWS_ENDPOINT_URL, profiles, env).",
                     no_args_is_help=True)


@s3_app.command("cp")
def cp_cmd(
    src: Annotated[str, typer.Argument(help="Local file/folder or s3://bucket/key (a prefix ending in / = folder).")],
    dst: Annotated[str, typer.Argument(help="Local path or s3://bucket/key (ending in / = into that prefix).")],
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Copy SRC to DST; either side may be s3://. Large files upload in parallel multipart.

    Example: sdmaker s3 cp model.tar.gz s3://bucket/models/
    """
    from sdmaker.errors import InvalidRequestError
    from sdmaker.store import _s3

    setup_logging(verbose)
    client = _s3.client_for(get_settings())
    src_s3, dst_s3 = _s3.is_s3_uri(src), _s3.is_s3_uri(dst)
    with byte_progress("copying") as progress:
        if not src_s3 and not dst_s3:
            raise InvalidRequestError("one of SRC and DST must be an s3:// URI", field="src", value=src)
        if not src_s3:
            path = Path(src).expanduser()
            if path.is_dir():
                uris = _s3.upload_dir(path, dst, progress, client=client)
                console.print(f"uploaded {len(uris)} files to {dst}", highlight=False, soft_wrap=True)
                return
            if not path.is_file():
                raise InvalidRequestError(f"{src} does not exist", field="src", value=src)
            console.print(_s3.upload(path, dst, progress, client=client), highlight=False, soft_wrap=True)
            return
        _, key = _s3.parse_s3_uri(src)
        if dst_s3:
            console.print(_s3.copy(src, dst, client=client), highlight=False, soft_wrap=True)
            return
        if not key or key.endswith("/"):
            files = _s3.download_prefix(src, Path(dst).expanduser(), progress, client=client)
            console.print(f"downloaded {len(files)} files to {dst}", highlight=False, soft_wrap=True)
            return
        console.print(str(_s3.download(src, Path(dst).expanduser(), progress, client=client)), highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.add_typer(s3_app, name="s3")
