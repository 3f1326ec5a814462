"""S3 transfers through boto3, and the one place botocore errors become ``S3Error``.

The client comes from boto3's standard configuration chain: env credentials, ``AWS_PROFILE`` and
``~/.aws``, and ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` (read by botocore itself), so MinIO,
moto or a real bucket all work without sdmaker-specific settings. Large files go multipart through
``boto3.s3.transfer.TransferConfig`` with several threads.

:func:`client_for` is the client sdmaker itself uses: the user's S3 when they configured an endpoint,
otherwise the daemon's built-in S3 (``settings.s3_endpoint_url``), signed with the daemon's key when it has one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from sdmaker.config import Settings
from sdmaker.errors import S3Error
from sdmaker.files import Progress, atomic_path, list_model_files, staged_dir

__all__ = ["S3Uri", "client_for", "copy", "download", "download_prefix", "exists", "get_bytes", "head", "is_s3_uri",
           "list_keys", "make_client", "parse_s3_uri", "put_bytes", "upload", "upload_dir"]

logger = logging.getLogger(__name__)

_MULTIPART_THRESHOLD = 64 * 1024 * 1024
_PART_SIZE = 64 * 1024 * 1024


class S3Uri(tuple[str, str]):
    """``(bucket, key)`` of an ``s3://bucket/key`` URI; ``key`` may be empty or end with ``/`` (a prefix)."""

    @property
    def bucket(self) -> str:
        return self[0]

    @property
    def key(self) -> str:
        return self[1]

    @property
    def is_prefix(self) -> bool:
        return self.key == "" or self.key.endswith("/")

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def is_s3_uri(value: object) -> bool:
    return isinstance(value, str) and value.startswith("s3://")


def parse_s3_uri(uri: str) -> S3Uri:
    """Split ``s3://bucket/key``; ``S3Error`` when the URI has no bucket."""
    if not is_s3_uri(uri):
        raise S3Error(f"{uri!r} is not an s3:// URI (expected s3://bucket/key)", uri=uri)
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise S3Error(f"{uri!r} has no bucket name (expected s3://bucket/key)", uri=uri)
    return S3Uri((bucket, key))


def make_client(endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client from the standard AWS configuration (``endpoint_url`` overrides the env)."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=16)
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def client_for(settings: Settings) -> Any:
    """The S3 client for ``settings``: :attr:`Settings.s3_endpoint_url`, and for the built-in S3 the daemon's
    SigV4 key (or, when none is configured, whatever credentials boto3 finds, dummies if none: on loopback
    the built-in S3 checks nothing) and path-style addressing (bucket names never become host names)."""
    if not settings.uses_builtin_s3:
        return make_client(settings.s3_endpoint_url)
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=16,
                    s3={"addressing_style": "path"})
    session = boto3.session.Session()
    key, secret = settings.auth_access_key_id, settings.auth_secret_access_key
    if not (key and secret) and session.get_credentials() is None:
        key, secret = "sdmaker", "sdmaker"
    return session.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.region, config=config,
                          aws_access_key_id=key if key and secret else None,
                          aws_secret_access_key=secret if key and secret else None)


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=_MULTIPART_THRESHOLD, multipart_chunksize=_PART_SIZE,
                          max_concurrency=8, use_threads=True)


@contextlib.contextmanager
def _mapped(action: str, bucket: str, key: str) -> Iterator[None]:
    """Translate botocore/boto3 exceptions into ``S3Error`` (bucket, key and AWS code in fields)."""
    from boto3.exceptions import Boto3Error, S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    where = f"s3://{bucket}/{key}"
    try:
        yield
    except ClientError as exc:
        err = exc.response.get("Error", {})
        code = str(err.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "Unknown"))
        if code in ("404", "NoSuchKey", "NotFound"):
            msg = f"{action} {where}: no such object"
        elif code == "NoSuchBucket":
            msg = f"{action} {where}: bucket {bucket!r} does not exist"
        elif code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            msg = f"{action} {where}: access denied ({code}); check AWS credentials/profile"
        else:
            msg = f"{action} {where}: {code}: {err.get('Message') or exc}"
        raise S3Error(msg, bucket=bucket, key=key, aws_code=code) from exc
    except NoCredentialsError as exc:
        raise S3Error(f"{action} {where}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                      "or AWS_PROFILE)", bucket=bucket, key=key, aws_code="NoCredentials") from exc
    except S3UploadFailedError as exc:
        cause = exc.__cause__ or exc.__context__
        code = getattr(cause, "response", {}).get("Error", {}).get("Code", "UploadFailed") if cause else "UploadFailed"
        raise S3Error(f"{action} {where}: {exc}", bucket=bucket, key=key, aws_code=str(code)) from exc
    except (BotoCoreError, Boto3Error) as exc:
        raise S3Error(f"{action} {where}: {exc}", bucket=bucket, key=key, aws_code=type(exc).__name__) from exc


class _Counter:
    """boto3 calls back with byte increments from several threads; callers want (done, total)."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total = total
        self.done = 0
        self._progress = progress
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self._lock:
            self.done += n
            done = self.done
        if self._progress is not None:
            self._progress(done, self.total)


def head(uri: str, *, client: Any = None) -> dict[str, Any]:
    """``HeadObject`` of ``uri`` (size in ``ContentLength``, ``ETag``)."""
    bucket, key = parse_s3_uri(uri)
    client = client or make_client()
    with _mapped("head", bucket, key):
        return dict(client.head_object(Bucket=bucket, Key=key))


def exists(uri: str, *, client: Any = None) -> bool:
    """Whether the object ``uri`` exists (``HeadObject``); other errors (access, no bucket) raise ``S3Error``."""
    bucket, key = parse_s3_uri(uri)
    client = client or make_client()
    try:
        with _mapped("head", bucket, key):
            client.head_object(Bucket=bucket, Key=key)
    except S3Error as exc:
        if exc.fields.get("aws_code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return True


def get_bytes(uri: str, *, limit: int, client: Any = None) -> tuple[bytes, str | None]:
    """The body of the object ``uri`` and its ``ContentType``; ``S3Error`` when it is over ``limit`` bytes
    (read no further than that: a 1 GB object never lands in memory)."""
    bucket, key = parse_s3_uri(uri)
    client = client or make_client()
    with _mapped("download", bucket, key):
        answer = client.get_object(Bucket=bucket, Key=key)
        size = int(answer.get("ContentLength") or 0)
        if size > limit:
            answer["Body"].close()
            raise S3Error(f"download {uri}: the object has {size} bytes, the limit is {limit}", bucket=bucket,
                          key=key, aws_code="EntityTooLarge")
        data = answer["Body"].read(limit + 1)
    if len(data) > limit:
        raise S3Error(f"download {uri}: the object is larger than {limit} bytes", bucket=bucket, key=key,
                      aws_code="EntityTooLarge")
    return data, answer.get("ContentType")


def put_bytes(uri: str, data: bytes, *, content_type: str, client: Any = None) -> None:
    """``PutObject`` of a complete body: S3 shows the object whole or not at all, never a part of it."""
    bucket, key = parse_s3_uri(uri)
    client = client or make_client()
    with _mapped("upload to", bucket, key):
        client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)


def upload(path: Path, uri: str, progress: Progress | None = None, *, client: Any = None) -> str:
    """Upload the file ``path`` to ``uri`` (a key, or a prefix ending in ``/`` that gets the file name)."""
    path = Path(path)
    bucket, key = parse_s3_uri(uri)
    if key == "" or key.endswith("/"):
        key = key + path.name
    if not path.is_file():
        raise S3Error(f"cannot upload {path}: not a file", bucket=bucket, key=key)
    client = client or make_client()
    counter = _Counter(path.stat().st_size, progress)
    with _mapped("upload to", bucket, key):
        client.upload_file(str(path), bucket, key, Config=_transfer_config(), Callback=counter)
    logger.info("uploaded %s to s3://%s/%s (%d bytes)", path, bucket, key, counter.total)
    return f"s3://{bucket}/{key}"


def upload_dir(folder: Path, uri: str, progress: Progress | None = None, *, client: Any = None) -> list[str]:
    """Upload the files of ``folder`` (:func:`sdmaker.files.list_model_files`) below the prefix ``uri``."""
    folder = Path(folder)
    bucket, prefix = parse_s3_uri(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    files = [folder / rel for rel in list_model_files(folder)]
    client = client or make_client()
    counter = _Counter(sum(p.stat().st_size for p in files), progress)
    out = []
    for path in files:
        key = prefix + path.relative_to(folder).as_posix()
        with _mapped("upload to", bucket, key):
            client.upload_file(str(path), bucket, key, Config=_transfer_config(), Callback=counter)
        out.append(f"s3://{bucket}/{key}")
    return out


def copy(src_uri: str, dst_uri: str, *, client: Any = None) -> str:
    """Server-side copy of an object (``dst_uri`` ending in ``/`` keeps the source's base name)."""
    bucket, key = parse_s3_uri(src_uri)
    dbucket, dkey = parse_s3_uri(dst_uri)
    if not dkey or dkey.endswith("/"):
        dkey += PurePosixPath(key).name
    client = client or make_client()
    with _mapped("copy", bucket, key):
        client.copy({"Bucket": bucket, "Key": key}, dbucket, dkey, Config=_transfer_config())
    return f"s3://{dbucket}/{dkey}"


def _atomic_download(client: Any, bucket: str, key: str, dest: Path, counter: _Counter) -> None:
    with atomic_path(dest) as tmp, _mapped("download", bucket, key):
        client.download_file(bucket, key, str(tmp), Config=_transfer_config(), Callback=counter)


def download(uri: str, path: Path, progress: Progress | None = None, *, client: Any = None) -> Path:
    """Download the object ``uri`` to ``path`` (an existing folder gets the key's base name). Atomic."""
    bucket, key = parse_s3_uri(uri)
    if not key or key.endswith("/"):
        raise S3Error(f"{uri} is a prefix, not an object; use download_prefix", bucket=bucket, key=key)
    path = Path(path)
    if path.is_dir():
        path = path / PurePosixPath(key).name
    client = client or make_client()
    with _mapped("head", bucket, key):
        size = int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
    _atomic_download(client, bucket, key, path, _Counter(size, progress))
    return path


def list_keys(uri: str, *, client: Any = None) -> list[tuple[str, int, str]]:
    """``(key, size, etag)`` of every object under the prefix ``uri``."""
    bucket, prefix = parse_s3_uri(uri)
    client = client or make_client()
    out: list[tuple[str, int, str]] = []
    with _mapped("list", bucket, prefix):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out.extend((obj["Key"], int(obj["Size"]), str(obj.get("ETag", ""))) for obj in page.get("Contents", []))
    return out


def _relative_key(key: str, prefix: str) -> str:
    """Key below ``prefix`` as a safe relative path: object keys may contain ``..`` or leading slashes."""
    rel = key[len(prefix):]
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in rel or "\x00" in rel:
        raise S3Error(f"refusing to download s3 key {key!r}: it is not a plain relative path below {prefix!r}",
                      key=key, aws_code="UnsafeKey")
    return rel


def download_prefix(uri: str, dest: Path, progress: Progress | None = None, *, client: Any = None) -> list[Path]:
    """Download every object under the prefix ``uri`` into ``dest`` (absent or empty), atomically.

    Keys ending in ``/`` (folder markers) are skipped; keys that would escape ``dest`` are refused
    before anything is downloaded.
    """
    bucket, prefix = parse_s3_uri(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    client = client or make_client()
    objects = [(k, s) for k, s, _ in list_keys(f"s3://{bucket}/{prefix}", client=client) if not k.endswith("/")]
    if not objects:
        raise S3Error(f"s3://{bucket}/{prefix} holds no objects", bucket=bucket, key=prefix, aws_code="NoSuchKey")
    rels = [(_relative_key(k, prefix), k) for k, _ in objects]
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise S3Error(f"download target {dest} exists and is not an empty folder", bucket=bucket, key=prefix)
    counter = _Counter(sum(s for _, s in objects), progress)
    with staged_dir(dest) as work:  # dest appears only when every object is down
        for rel, key in rels:
            _atomic_download(client, bucket, key, work / rel, counter)
    return [dest / rel for rel, _ in rels]
