"""The built-in S3 (``sdmaker up`` at ``/s3``) driven by boto3 against a real daemon process.

One daemon per module (no S3 endpoint configured, so it serves and uses its own S3); a second one with
authentication required for the SigV4 / presigned checks. Durability is checked by kill -9 and restart.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import signal
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError
from conftest import DaemonProcess, write_fake_model

MiB = 1024 * 1024


def _own_s3_daemon(home: Path, **env: str) -> DaemonProcess:
    """A daemon with no S3 endpoint of the user's own: it serves (and itself uses) the built-in S3."""
    d = DaemonProcess(home, env={"SDMAKER_STANDBY_WORKERS": "0", "AWS_CONFIG_FILE": str(home / "no-aws-config"),
                                 **env})
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        d.env.pop(name, None)
    return d


def _client(daemon: DaemonProcess, key: str = "testing", secret: str = "testing", **config: Any) -> Any:
    return boto3.client("s3", endpoint_url=daemon.url + "/s3", region_name="us-east-1", aws_access_key_id=key,
                        aws_secret_access_key=secret,
                        config=Config(retries={"max_attempts": 1, "mode": "standard"}, **config))


@pytest.fixture(scope="module")
def s3_daemon(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = _own_s3_daemon(tmp_path_factory.mktemp("s3-home")).start()
    yield d
    d.stop()


@pytest.fixture
def s3(s3_daemon: DaemonProcess) -> Any:
    return _client(s3_daemon)


@pytest.fixture
def bucket(s3: Any, request: pytest.FixtureRequest) -> str:
    name = "b-" + hashlib.sha256(request.node.name.encode()).hexdigest()[:12]
    s3.create_bucket(Bucket=name)
    return name


def _code(exc: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    return exc.value.response["Error"]["Code"], exc.value.response["ResponseMetadata"]["HTTPStatusCode"]


def test_buckets(s3: Any) -> None:
    s3.create_bucket(Bucket="lifecycle")
    with pytest.raises(ClientError) as exc:
        s3.create_bucket(Bucket="lifecycle")
    assert _code(exc) == ("BucketAlreadyOwnedByYou", 409)
    assert "lifecycle" in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    s3.head_bucket(Bucket="lifecycle")
    assert s3.get_bucket_location(Bucket="lifecycle")["LocationConstraint"] is None  # us-east-1, as in S3
    with pytest.raises(ClientError) as exc:
        s3.create_bucket(Bucket="Bad_Name")
    assert _code(exc) == ("InvalidBucketName", 400)
    s3.put_object(Bucket="lifecycle", Key="k", Body=b"x")
    with pytest.raises(ClientError) as exc:
        s3.delete_bucket(Bucket="lifecycle")
    assert _code(exc) == ("BucketNotEmpty", 409)
    s3.delete_object(Bucket="lifecycle", Key="k")
    s3.delete_bucket(Bucket="lifecycle")
    with pytest.raises(ClientError) as exc:
        s3.head_bucket(Bucket="lifecycle")
    assert _code(exc) == ("404", 404)
    with pytest.raises(ClientError) as exc:
        s3.list_objects_v2(Bucket="lifecycle")
    assert _code(exc) == ("NoSuchBucket", 404)
    assert exc.value.response["Error"]["BucketName"] == "lifecycle"


def test_objects_round_trip_with_metadata_etag_and_range(s3: Any, bucket: str) -> None:
    data = bytes(range(256)) * 40
    put = s3.put_object(Bucket=bucket, Key="dir/file.bin", Body=data, ContentType="image/png",
                        Metadata={"Seed": "42"}, ContentDisposition="inline")
    assert put["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'
    got = s3.get_object(Bucket=bucket, Key="dir/file.bin")
    assert got["Body"].read() == data
    assert (got["ContentType"], got["Metadata"], got["ContentDisposition"]) == ("image/png", {"seed": "42"}, "inline")
    assert got["ETag"] == put["ETag"] and got["ContentLength"] == len(data)
    head = s3.head_object(Bucket=bucket, Key="dir/file.bin")
    assert (head["ContentLength"], head["ETag"], head["ContentType"]) == (len(data), put["ETag"], "image/png")
    for spec, want in [("bytes=2-4", data[2:5]), ("bytes=-3", data[-3:]), ("bytes=10235-", data[10235:]),
                       ("bytes=10230-99999", data[10230:])]:
        part = s3.get_object(Bucket=bucket, Key="dir/file.bin", Range=spec)
        assert part["Body"].read() == want and part["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert s3.get_object(Bucket=bucket, Key="dir/file.bin", Range="bytes=2-4")["ContentRange"] == "bytes 2-4/10240"
    with pytest.raises(ClientError) as exc:
        s3.get_object(Bucket=bucket, Key="dir/file.bin", Range="bytes=20000-")
    assert _code(exc) == ("InvalidRange", 416)
    with pytest.raises(ClientError) as exc:
        s3.get_object(Bucket=bucket, Key="dir/file.bin", IfNoneMatch=put["ETag"])
    assert _code(exc)[1] == 304
    with pytest.raises(ClientError) as exc:
        s3.get_object(Bucket=bucket, Key="missing")
    assert _code(exc) == ("NoSuchKey", 404)
    assert exc.value.response["Error"]["Key"] == "missing"
    s3.put_object(Bucket=bucket, Key="empty", Body=b"")
    assert s3.get_object(Bucket=bucket, Key="empty")["Body"].read() == b""


def test_conditional_put_copy_and_deletes(s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="once", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as exc:
        s3.put_object(Bucket=bucket, Key="once", Body=b"second", IfNoneMatch="*")
    assert _code(exc) == ("PreconditionFailed", 412)
    assert s3.get_object(Bucket=bucket, Key="once")["Body"].read() == b"first"
    copied = s3.copy_object(Bucket=bucket, Key="copy", CopySource={"Bucket": bucket, "Key": "once"})
    assert copied["CopyObjectResult"]["ETag"] == f'"{hashlib.md5(b"first").hexdigest()}"'
    s3.copy_object(Bucket=bucket, Key="typed", CopySource=f"{bucket}/once", MetadataDirective="REPLACE",
                   ContentType="text/plain", Metadata={"a": "b"})
    typed = s3.head_object(Bucket=bucket, Key="typed")
    assert (typed["ContentType"], typed["Metadata"]) == ("text/plain", {"a": "b"})
    with pytest.raises(ClientError) as exc:
        s3.copy_object(Bucket=bucket, Key="x", CopySource={"Bucket": bucket, "Key": "absent"})
    assert _code(exc) == ("NoSuchKey", 404)
    s3.delete_object(Bucket=bucket, Key="never-existed")  # S3 answers 204 for a missing key too
    result = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "once"}, {"Key": "copy"}]})
    assert sorted(d["Key"] for d in result["Deleted"]) == ["copy", "once"]
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])] == ["typed"]


def test_listing_pagination_prefix_and_delimiter(s3: Any, bucket: str) -> None:
    keys = sorted([f"logs/2026/{i:02d}.txt" for i in range(12)] + [f"img/{i}.png" for i in range(5)]
                  + ["top", "logs/readme", "a b+c%d/ü.txt"])
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode())
    pages = list(s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, PaginationConfig={"PageSize": 4}))
    assert [o["Key"] for p in pages for o in p.get("Contents", [])] == keys
    assert len(pages) == 5 and all(p["KeyCount"] <= 4 for p in pages) and not pages[-1]["IsTruncated"]
    v1 = list(s3.get_paginator("list_objects").paginate(Bucket=bucket, PaginationConfig={"PageSize": 6}))
    assert [o["Key"] for p in v1 for o in p.get("Contents", [])] == keys
    top = s3.list_objects_v2(Bucket=bucket, Delimiter="/")
    assert [p["Prefix"] for p in top["CommonPrefixes"]] == ["a b+c%d/", "img/", "logs/"]
    assert [o["Key"] for o in top["Contents"]] == ["top"]
    logs = s3.list_objects_v2(Bucket=bucket, Prefix="logs/", Delimiter="/")
    assert [p["Prefix"] for p in logs["CommonPrefixes"]] == ["logs/2026/"]
    assert [o["Key"] for o in logs["Contents"]] == ["logs/readme"]
    # common prefixes count toward max-keys, and a page never splits one
    paged = list(s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Delimiter="/",
                                                              PaginationConfig={"PageSize": 2}))
    assert [p["Prefix"] for page in paged for p in page.get("CommonPrefixes", [])] == ["a b+c%d/", "img/", "logs/"]
    assert [o["Key"] for page in paged for o in page.get("Contents", [])] == ["top"]
    s3.put_object(Bucket=bucket, Key="img/", Body=b"")  # a folder marker equal to the prefix is a key
    marked = list(s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="img/", Delimiter="/",
                                                               PaginationConfig={"PageSize": 1}))
    assert [o["Key"] for p in marked for o in p.get("Contents", [])] == ["img/"] + [f"img/{i}.png" for i in range(5)]
    after = s3.list_objects_v2(Bucket=bucket, Prefix="logs/2026/", StartAfter="logs/2026/09.txt")
    assert [o["Key"] for o in after["Contents"]] == ["logs/2026/10.txt", "logs/2026/11.txt"]
    assert s3.list_objects_v2(Bucket=bucket, Prefix="nothing/")["KeyCount"] == 0
    with pytest.raises(ClientError) as exc:
        s3.list_objects_v2(Bucket=bucket, ContinuationToken="!!not-a-token!!")
    assert _code(exc) == ("InvalidArgument", 400)


def test_multipart_upload_copy_and_download(s3: Any, bucket: str, tmp_path: Path) -> None:
    data = os.urandom(11 * MiB)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    config = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=3)
    s3.upload_file(str(src), bucket, "big.bin", Config=config)
    parts = [data[i:i + 5 * MiB] for i in range(0, len(data), 5 * MiB)]
    md5s = b"".join(hashlib.md5(p).digest() for p in parts)
    head = s3.head_object(Bucket=bucket, Key="big.bin")
    assert head["ETag"] == f'"{hashlib.md5(md5s).hexdigest()}-3"' and head["ContentLength"] == len(data)
    s3.download_file(bucket, "big.bin", str(tmp_path / "back.bin"), Config=config)
    assert (tmp_path / "back.bin").read_bytes() == data
    s3.copy({"Bucket": bucket, "Key": "big.bin"}, bucket, "big-copy.bin", Config=config)  # UploadPartCopy
    assert s3.get_object(Bucket=bucket, Key="big-copy.bin")["Body"].read() == data

    upload = s3.create_multipart_upload(Bucket=bucket, Key="small-parts")["UploadId"]
    etags = [s3.upload_part(Bucket=bucket, Key="small-parts", UploadId=upload, PartNumber=n, Body=b"x" * 10)["ETag"]
             for n in (1, 2)]
    assert [p["PartNumber"] for p in s3.list_parts(Bucket=bucket, Key="small-parts", UploadId=upload)["Parts"]] == [1, 2]
    with pytest.raises(ClientError) as exc:  # parts but the last must be >= 5 MiB, as in S3
        s3.complete_multipart_upload(Bucket=bucket, Key="small-parts", UploadId=upload, MultipartUpload={
            "Parts": [{"PartNumber": n, "ETag": e} for n, e in zip((1, 2), etags, strict=True)]})
    assert _code(exc) == ("EntityTooSmall", 400)
    with pytest.raises(ClientError) as exc:
        s3.complete_multipart_upload(Bucket=bucket, Key="small-parts", UploadId=upload, MultipartUpload={
            "Parts": [{"PartNumber": 1, "ETag": '"0000"'}]})
    assert _code(exc) == ("InvalidPart", 400)
    done = s3.complete_multipart_upload(Bucket=bucket, Key="small-parts", UploadId=upload,
                                        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etags[0]}]})
    assert done["ETag"].endswith('-1"')
    abort = s3.create_multipart_upload(Bucket=bucket, Key="aborted")["UploadId"]
    s3.upload_part(Bucket=bucket, Key="aborted", UploadId=abort, PartNumber=1, Body=b"y")
    s3.abort_multipart_upload(Bucket=bucket, Key="aborted", UploadId=abort)
    with pytest.raises(ClientError) as exc:
        s3.list_parts(Bucket=bucket, Key="aborted", UploadId=abort)
    assert _code(exc) == ("NoSuchUpload", 404)


def test_bad_input_is_an_s3_error_and_stays_inside_the_data_dir(s3: Any, bucket: str, s3_daemon: DaemonProcess,
                                                               tmp_path: Path) -> None:
    odd = ["../../../escape", "/abs/olute", "a//b", "..", "./x", "sp ace+plus%25", "ünï/cødé", "q?x=1#frag"]
    for key in odd:
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode())
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == key.encode()
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(listed) == sorted(odd)
    home = s3_daemon.home
    assert list(home.parent.rglob("*escape*")) == [] and not Path("/abs/olute").exists()
    for path in (home / "s3").rglob("*"):  # keys are never file names: only the index, blobs and parts
        assert path.is_dir() or path.name.startswith("index.sqlite3") or (
            path.parent.name == "blobs" and len(path.name) == 64) or path.parent.parent.name == "uploads", path
    base = s3_daemon.url + "/s3"
    for method, url, body in [
        ("PUT", f"{base}/{bucket}/nul%00key", b"x"),
        ("PUT", f"{base}/{bucket}/" + "k" * 1100, b"x"),
        ("POST", f"{base}/{bucket}?delete", b"<Delete><Object><Key>a</Key></Object>"),
        ("POST", f"{base}/{bucket}?delete", b'<!DOCTYPE d [<!ENTITY x "y">]><Delete><Object><Key>&x;</Key></Object>'
                                            b"</Delete>"),
        ("POST", f"{base}/{bucket}?delete", b"<Wrong/>"),
        ("POST", f"{base}/{bucket}/k?uploadId=nope", b"<CompleteMultipartUpload/>"),
        ("PUT", f"{base}/{bucket}/k?partNumber=0&uploadId=x", b"x"),
        ("GET", f"{base}/{bucket}?max-keys=abc", b""),
        ("GET", f"{base}/{bucket}/%ff%fe", b""),
        ("PUT", f"{base}/{bucket}/k", b"body"),  # wrong declared digest below
        ("PUT", f"{base}/{bucket}?tagging", b""),
        ("PATCH", f"{base}/{bucket}/k", b""),
        ("PUT", f"{base}/{bucket}/k", b"5\r\nchunk\r\n0\r\n\r\n"),  # aws-chunked framing: refused, not stored
    ]:
        headers = {"x-amz-content-sha256": "0" * 64} if body == b"body" else {}
        if body.startswith(b"5\r\n"):
            headers = {"content-encoding": "aws-chunked", "x-amz-decoded-content-length": "5"}
        res = httpx.request(method, url, content=body, headers=headers)
        assert 400 <= res.status_code < 500 or res.status_code == 501, (method, url, res.status_code, res.text)
        assert res.text.startswith("<?xml") and "<Code>" in res.text, res.text
    with pytest.raises(ClientError) as exc:
        s3.get_object(Bucket=bucket, Key="k")
    assert _code(exc) == ("NoSuchKey", 404)  # the body whose digest did not match was not stored


def test_objects_survive_kill_9(s3_daemon: DaemonProcess, tmp_path: Path) -> None:
    daemon = s3_daemon
    s3 = _client(daemon)
    s3.create_bucket(Bucket="durable")
    data = os.urandom(6 * MiB)
    (tmp_path / "f").write_bytes(data)
    s3.upload_file(str(tmp_path / "f"), "durable", "multi", Config=TransferConfig(
        multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB))
    s3.put_object(Bucket="durable", Key="small", Body=b"kept", ContentType="text/x-kept")
    s3.put_object(Bucket="durable", Key="replaced", Body=b"old")
    s3.put_object(Bucket="durable", Key="replaced", Body=b"new")
    pending = s3.create_multipart_upload(Bucket="durable", Key="pending")["UploadId"]
    s3.upload_part(Bucket="durable", Key="pending", UploadId=pending, PartNumber=1, Body=b"p" * 100)
    daemon.stop(signal.SIGKILL)
    # a crash mid-write leaves a temp file; the restart removes it
    (daemon.home / "s3" / "tmp" / ".tmp-obj-crashed").write_bytes(b"partial")
    daemon.start()  # same home, same port
    s3 = _client(daemon)
    assert s3.get_object(Bucket="durable", Key="multi")["Body"].read() == data
    small = s3.get_object(Bucket="durable", Key="small")
    assert (small["Body"].read(), small["ContentType"]) == (b"kept", "text/x-kept")
    assert s3.get_object(Bucket="durable", Key="replaced")["Body"].read() == b"new"
    assert [p["Size"] for p in s3.list_parts(Bucket="durable", Key="pending", UploadId=pending)["Parts"]] == [100]
    assert not (daemon.home / "s3" / "tmp" / ".tmp-obj-crashed").exists()
    blobs = {p.name for p in (daemon.home / "s3" / "blobs").iterdir()}
    assert hashlib.sha256(b"old").hexdigest() not in blobs  # the replaced version's bytes are gone


def test_objects_equal_to_model_files_are_stored_once(s3: Any, bucket: str, s3_daemon: DaemonProcess,
                                                      tmp_path: Path) -> None:
    from sdmaker.config import load_settings
    from sdmaker.store import Store

    settings = load_settings({"SDMAKER_HOME": str(s3_daemon.home)})
    store = Store(settings.store_dir, settings=settings)
    model = write_fake_model(tmp_path / "m1", seed=11, weight_bytes=256 * 1024)
    manifest = store.import_folder(model, name="dedup-a")
    weights = next(f for f in manifest.files if f.path.startswith("unet/"))
    s3.upload_file(str(model / weights.path), bucket, "model/unet.safetensors")  # S3 after the store
    s3_blob = s3_daemon.home / "s3" / "blobs" / weights.sha256
    assert os.stat(s3_blob).st_ino == os.stat(store.blob_path(weights.sha256)).st_ino

    other = write_fake_model(tmp_path / "m2", seed=12, weight_bytes=256 * 1024)
    rel = "vae/diffusion_pytorch_model.safetensors"
    s3.upload_file(str(other / rel), bucket, "model/vae.safetensors")  # S3 before the store
    manifest = store.import_folder(other, name="dedup-b")
    sha = next(f.sha256 for f in manifest.files if f.path == rel)
    assert os.stat(store.blob_path(sha)).st_ino == os.stat(s3_daemon.home / "s3" / "blobs" / sha).st_ino
    assert os.stat(store.blob_path(sha)).st_nlink >= 3  # store blob, snapshot link, S3 blob: one inode


@pytest.fixture(scope="module")
def auth_daemon(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = _own_s3_daemon(tmp_path_factory.mktemp("s3-auth-home"), SDMAKER_REQUIRE_AUTH="1",
                       SDMAKER_ACCESS_KEY_ID="AKIDS3TEST", SDMAKER_SECRET_ACCESS_KEY="s3-secret").start()
    yield d
    d.stop()


def test_auth_sigv4_and_presigned_urls(auth_daemon: DaemonProcess, tmp_path: Path) -> None:
    good = _client(auth_daemon, "AKIDS3TEST", "s3-secret")
    good.create_bucket(Bucket="private")
    key = "dir/a b+ü.txt"
    good.put_object(Bucket="private", Key=key, Body=b"secret bytes")
    (tmp_path / "big").write_bytes(os.urandom(6 * MiB))
    good.upload_file(str(tmp_path / "big"), "private", "big", Config=TransferConfig(
        multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB))
    assert good.get_object(Bucket="private", Key=key)["Body"].read() == b"secret bytes"

    res = httpx.get(f"{auth_daemon.url}/s3/private/dir/a%20b%2B%C3%BC.txt")
    assert res.status_code == 403 and "<Code>AccessDenied</Code>" in res.text
    with pytest.raises(ClientError) as exc:
        _client(auth_daemon, "AKIDS3TEST", "wrong").get_object(Bucket="private", Key=key)
    assert _code(exc) == ("SignatureDoesNotMatch", 403)

    for client in (good, _client(auth_daemon, "AKIDS3TEST", "s3-secret", signature_version="s3v4")):
        url = client.generate_presigned_url("get_object", Params={"Bucket": "private", "Key": key}, ExpiresIn=60)
        assert httpx.get(url).content == b"secret bytes"
        assert httpx.get(url.replace("private/dir", "private/dir2")).status_code == 403
    bearer = httpx.get(f"{auth_daemon.url}/s3/private/dir/a%20b%2B%C3%BC.txt",
                       headers={"Authorization": "Bearer nope"})
    assert bearer.status_code == 403
    expired = good.generate_presigned_url("get_object", Params={"Bucket": "private", "Key": key}, ExpiresIn=1)
    expires = int(dict(p.split("=", 1) for p in expired.split("?", 1)[1].split("&"))["Expires"])
    assert dt.datetime.now().timestamp() < expires + 60
    stale = expired.replace(f"Expires={expires}", f"Expires={expires - 3600}")
    assert httpx.get(stale).status_code == 403
    put_url = good.generate_presigned_url("put_object", Params={"Bucket": "private", "Key": "p"}, ExpiresIn=60)
    assert httpx.put(put_url, content=b"x").status_code == 403  # presigned uploads are not accepted


def test_sdk_uploader_downloader_and_default_bucket(s3_daemon: DaemonProcess, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"AWS_ENDPOINT_URL_S3": s3_daemon.url + "/s3", "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_CONFIG_FILE": str(tmp_path / "none")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("SAGEMAKER_USER_CONFIG_OVERRIDE", raising=False)
    import sagemaker
    from sagemaker.s3 import S3Downloader, S3Uploader

    session = sagemaker.Session(boto_session=boto3.Session(region_name="us-east-1"), default_bucket="sdk-bucket")
    assert session.default_bucket() == "sdk-bucket"  # created by the SDK (ListBuckets, HeadBucket, CreateBucket)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.txt").write_text("alpha")
    (tmp_path / "folder" / "b.json").write_text("{}")
    uri = S3Uploader.upload(str(tmp_path / "folder"), "s3://sdk-bucket/up", sagemaker_session=session)
    assert uri == "s3://sdk-bucket/up"
    assert sorted(S3Downloader.list(uri, sagemaker_session=session)) == ["s3://sdk-bucket/up/a.txt",
                                                                           "s3://sdk-bucket/up/b.json"]
    S3Downloader.download(uri, str(tmp_path / "down"), sagemaker_session=session)
    assert (tmp_path / "down" / "a.txt").read_text() == "alpha"
    assert S3Downloader.read_file("s3://sdk-bucket/up/a.txt", sagemaker_session=session) == "alpha"
    data_uri = session.upload_data(str(tmp_path / "folder" / "a.txt"), bucket="sdk-bucket", key_prefix="data")
    assert data_uri == "s3://sdk-bucket/data/a.txt"


def test_env_exports_the_builtin_s3_unless_the_user_has_one(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sdmaker.cli import app
    from sdmaker.config import load_settings

    base = {"SDMAKER_HOME": str(tmp_path), "HOME": str(tmp_path), "SDMAKER_PORT": "9123"}
    assert load_settings(base).s3_endpoint_url == "http://127.0.0.1:9123/s3"
    assert load_settings({**base, "AWS_ENDPOINT_URL_S3": "http://minio:9000"}).s3_endpoint_url == "http://minio:9000"
    assert load_settings({**base, "SDMAKER_S3": "off"}).s3_endpoint_url is None
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "config").write_text("[profile ceph]\nservices = mine\n[services mine]\ns3 =\n"
                                              "  endpoint_url = http://ceph:7480\n[default]\nregion = us-east-1\n")
    assert load_settings(base).uses_builtin_s3
    assert not load_settings({**base, "AWS_PROFILE": "ceph"}).uses_builtin_s3
    assert load_settings({**base, "AWS_PROFILE": "ceph"}).s3_endpoint_url is None  # botocore reads the file itself
    assert load_settings({**base, "AWS_PROFILE": "ceph", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"}).uses_builtin_s3

    runner = CliRunner()
    clean = dict.fromkeys(("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE", "SDMAKER_URL", "SDMAKER_S3"))
    res = runner.invoke(app, ["env"], env={**clean, **base})
    assert res.exit_code == 0, res.output
    assert "export AWS_ENDPOINT_URL_S3=http://127.0.0.1:9123/s3" in res.output
    res = runner.invoke(app, ["env"], env={**clean, **base, "AWS_ENDPOINT_URL_S3": "http://minio:9000"})
    assert res.exit_code == 0 and "AWS_ENDPOINT_URL_S3" not in res.output
