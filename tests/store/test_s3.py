"""S3 transfers and S3 model sources against a real moto server on 127.0.0.1."""

from __future__ import annotations

import os
from pathlib import Path

import boto3
import pytest

from sdmaker.config import load_settings
from sdmaker.errors import S3Error
from sdmaker.files import tree_digest
from sdmaker.store import Store, _s3, package_model, parse_s3_uri, resolve_model


def _client():  # type: ignore[no-untyped-def]
    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"], region_name="us-east-1")


def test_parse_s3_uri() -> None:
    uri = parse_s3_uri("s3://bucket/a/b/model.tar.gz")
    assert (uri.bucket, uri.key, uri.is_prefix) == ("bucket", "a/b/model.tar.gz", False)
    assert parse_s3_uri("s3://bucket/p/").is_prefix and parse_s3_uri("s3://bucket").key == ""
    for bad in ("s3://", "s3:///key", "http://x/y"):
        with pytest.raises(S3Error):
            parse_s3_uri(bad)


def test_multipart_upload_download_round_trip(s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    monkeypatch.setattr(_s3, "_MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(_s3, "_PART_SIZE", 5 * 1024 * 1024)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * 1024 * 1024))
    seen: list[tuple[int, int]] = []
    uri = _s3.upload(src, f"s3://{s3_bucket}/models/", lambda d, t: seen.append((d, t)))
    assert uri == f"s3://{s3_bucket}/models/big.bin"
    assert seen[-1] == (src.stat().st_size, src.stat().st_size)
    assert "-3" in _s3.head(uri)["ETag"]  # 3 parts: it really went multipart
    back = _s3.download(uri, tmp_path / "back.bin")
    assert back.read_bytes() == src.read_bytes()
    assert _s3.download(uri, tmp_path).name == "big.bin"  # into a folder: keeps the key's name


def test_errors_are_mapped_with_fields(s3_bucket: str, tmp_path: Path) -> None:
    with pytest.raises(S3Error, match="no such object") as info:
        _s3.download(f"s3://{s3_bucket}/missing.tar.gz", tmp_path / "x")
    assert info.value.fields == {"bucket": s3_bucket, "key": "missing.tar.gz", "aws_code": "404"}
    assert not (tmp_path / "x").exists()
    (tmp_path / "f").write_bytes(b"data")
    with pytest.raises(S3Error) as info:
        _s3.upload(tmp_path / "f", "s3://no-such-bucket-sdmaker/f")
    assert info.value.fields["aws_code"] == "NoSuchBucket"
    with pytest.raises(S3Error, match="holds no objects"):
        _s3.download_prefix(f"s3://{s3_bucket}/empty/", tmp_path / "d")


def test_download_prefix_refuses_escaping_keys(s3_bucket: str, tmp_path: Path) -> None:
    client = _client()
    client.put_object(Bucket=s3_bucket, Key="m/model_index.json", Body=b"{}")
    client.put_object(Bucket=s3_bucket, Key="m/../../evil.txt", Body=b"evil")
    with pytest.raises(S3Error, match="not a plain relative path"):
        _s3.download_prefix(f"s3://{s3_bucket}/m/", tmp_path / "dest")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_import_from_s3_prefix_and_archive(s3_bucket: str, tmp_path: Path, fake_model_dir: Path) -> None:
    settings = load_settings()
    store = Store(tmp_path / "store", settings=settings)
    _s3.upload_dir(fake_model_dir, f"s3://{s3_bucket}/folder/")
    m = store.import_model(f"s3://{s3_bucket}/folder/", name="from-prefix")
    assert m.digest == tree_digest(fake_model_dir)
    assert m.source == f"s3://{s3_bucket}/folder/"
    result = package_model(fake_model_dir, f"s3://{s3_bucket}/art/model.tar.gz", seed_handler=True)
    assert result.path == f"s3://{s3_bucket}/art/model.tar.gz"
    m2 = store.import_model(result.path, name="from-archive")
    model_files = {(f.path, f.sha256) for f in m2.files if not f.path.startswith("code/")}
    assert model_files == {(f.path, f.sha256) for f in m.files}
    assert (store.model_path("from-archive") / "code" / "inference.py").is_file()
    assert sorted(p.name for p in (store.root / "staging").iterdir()) == []


def test_resolve_s3_archive_imports_once(s3_bucket: str, sdmaker_home: Path, fake_model_dir: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    uri = package_model(fake_model_dir, f"s3://{s3_bucket}/model.tar.gz").path
    first = resolve_model(uri, settings)
    assert first.name.startswith("model-") and first.digest == tree_digest(first.path)

    def no_download(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("second resolve must not download again")

    monkeypatch.setattr(_s3, "download", no_download)
    again = resolve_model(uri, settings)
    assert again == first
