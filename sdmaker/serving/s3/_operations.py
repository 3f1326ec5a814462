"""The S3 operations of the built-in S3: one request (:class:`Call`) in, one starlette ``Response`` out.

Covered (what boto3, s3transfer and the SageMaker Python SDK call): ListBuckets, CreateBucket, HeadBucket,
DeleteBucket, GetBucketLocation, GetBucketVersioning, ListObjects (v1) and ListObjectsV2 (prefix,
delimiter, max-keys, markers and continuation tokens, ``encoding-type=url``), PutObject (conditional with
``If-None-Match: *`` / ``If-Match``), GetObject (``Range``, conditional headers, ``response-*`` overrides),
HeadObject, DeleteObject, DeleteObjects, CopyObject, and multipart uploads (Create, UploadPart,
UploadPartCopy, Complete, Abort, ListParts, ListMultipartUploads). Anything else is ``501 NotImplemented``.
Blocking file and SQLite work runs in threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import IO, Any
from urllib.parse import unquote

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from sdmaker.config import Settings
from sdmaker.errors import S3ApiError
from sdmaker.serving.s3._objects import MAX_PART_NUMBER, BlobWriter, ObjectInfo, ObjectStore
from sdmaker.serving.s3._xml import Node, child_text, children, document, http_date, iso_date, parse_xml, url_encode

__all__ = ["Call", "dispatch"]

_MAX_OBJECT_BYTES = 5 * 1024**3  # S3's single PUT / part limit
_MAX_KEY_BYTES = 1024
_MAX_META_BYTES = 2048
_FLUSH_BYTES = 1024 * 1024
_READ_CHUNK = 1024 * 1024
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP_LIKE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
# characters XML 1.0 cannot carry: a key holding them could never be listed
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
_STORED_HEADERS = ("content-type", "content-encoding", "content-disposition", "content-language", "cache-control",
                   "expires")
_OVERRIDES = {"response-content-type": "content-type", "response-content-language": "content-language",
              "response-expires": "expires", "response-cache-control": "cache-control",
              "response-content-disposition": "content-disposition",
              "response-content-encoding": "content-encoding"}


@dataclass
class Call:
    """One S3 request: method, bucket and key (decoded from the path), first value of each query parameter."""

    method: str
    bucket: str
    key: str
    query: dict[str, str]
    headers: Headers
    request: Request
    settings: Settings
    raw_path: str
    body: bytes | None = field(default=None)

    @property
    def streams_body(self) -> bool:
        """PutObject and UploadPart: bodies up to 5 GiB, streamed to disk (never read into memory)."""
        return self.method == "PUT" and bool(self.key) and "x-amz-copy-source" not in self.headers


Handler = Callable[[Call, ObjectStore], Awaitable[Response]]


async def dispatch(call: Call, store: ObjectStore) -> Response:
    """Run the operation ``call`` names (method + sub-resource) against ``store``."""
    if not call.bucket:
        if call.method == "GET":
            return await _list_buckets(call, store)
        raise _not_implemented(call)
    handler = _bucket_handler(call) if not call.key else _object_handler(call)
    if handler is None:
        raise _not_implemented(call)
    if call.key:
        _check_key(call.key)
    return await handler(call, store)


def _bucket_handler(call: Call) -> Handler | None:
    q, m = call.query, call.method
    if m == "GET":
        for sub, handler in (("location", _get_location), ("versioning", _get_versioning), ("uploads", _list_uploads)):
            if sub in q:
                return handler
        if set(q) & {"acl", "policy", "cors", "lifecycle", "tagging", "encryption", "website", "logging",
                     "notification", "replication", "object-lock", "ownershipControls", "publicAccessBlock"}:
            return None
        return _list_objects
    if q and m != "POST":
        return None  # PUT ?versioning, DELETE ?cors, ...: not offered
    return {"PUT": _create_bucket, "HEAD": _head_bucket, "DELETE": _delete_bucket,
            "POST": _delete_objects if "delete" in q else None}.get(m)


def _object_handler(call: Call) -> Handler | None:
    q, m = call.query, call.method
    if set(q) & {"acl", "tagging", "retention", "legal-hold", "torrent", "restore", "select", "attributes"}:
        return None
    if m == "PUT":
        if "uploadId" in q:
            return _copy_part if "x-amz-copy-source" in call.headers else _upload_part
        return _copy_object if "x-amz-copy-source" in call.headers else _put_object
    if m == "POST":
        return _create_upload if "uploads" in q else _complete_upload if "uploadId" in q else None
    if m == "GET":
        return _list_parts if "uploadId" in q else _get_object
    if m == "HEAD":
        return _get_object
    if m == "DELETE":
        return _abort_upload if "uploadId" in q else _delete_object
    return None


def _not_implemented(call: Call) -> S3ApiError:
    return S3ApiError("NotImplemented", f"{call.method} {call.raw_path} with "
                      f"{', '.join(sorted(call.query)) or 'no sub-resource'} is not implemented by sdmaker's "
                      "built-in S3.", 501)


def _check_key(key: str) -> None:
    if len(key.encode("utf-8")) > _MAX_KEY_BYTES:
        raise S3ApiError("KeyTooLongError", f"Your key is too long (at most {_MAX_KEY_BYTES} bytes of UTF-8).", 400,
                         key=key[:64] + "...")
    if _NOT_XML.search(key):
        raise S3ApiError("InvalidArgument", "Object keys may not contain control characters that XML cannot "
                         "carry (such as NUL).", 400, argument="key")


def _xml(root: str, children_: list[Node], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(document(root, children_), status_code=status, media_type="application/xml", headers=headers)


def _etag(info: ObjectInfo) -> str:
    return f'"{info.etag}"'


def _owner(settings: Settings) -> Node:
    return ("Owner", [("ID", settings.account_id), ("DisplayName", "sdmaker")])


# --- buckets ---------------------------------------------------------------------------------------


async def _list_buckets(call: Call, store: ObjectStore) -> Response:
    buckets = await asyncio.to_thread(store.list_buckets)
    return _xml("ListAllMyBucketsResult", [_owner(call.settings), ("Buckets", [
        ("Bucket", [("Name", name), ("CreationDate", iso_date(created))]) for name, created in buckets])])


async def _create_bucket(call: Call, store: ObjectStore) -> Response:
    name = call.bucket
    if not _BUCKET_NAME.match(name) or ".." in name or _IP_LIKE.match(name):
        raise S3ApiError("InvalidBucketName", "The specified bucket is not valid (3-63 characters: lower-case "
                         "letters, digits, dots and hyphens, starting and ending with a letter or digit).", 400,
                         bucket=name)
    if call.body:
        parse_xml(call.body, "CreateBucketConfiguration")
    await asyncio.to_thread(store.create_bucket, name)
    return Response(status_code=200, headers={"Location": f"/{name}"})


async def _head_bucket(call: Call, store: ObjectStore) -> Response:
    await asyncio.to_thread(store.bucket_created, call.bucket)
    return Response(status_code=200, headers={"x-amz-bucket-region": call.settings.region})


async def _delete_bucket(call: Call, store: ObjectStore) -> Response:
    await asyncio.to_thread(store.delete_bucket, call.bucket)
    return Response(status_code=204)


async def _get_location(call: Call, store: ObjectStore) -> Response:
    await asyncio.to_thread(store.bucket_created, call.bucket)
    region = "" if call.settings.region == "us-east-1" else call.settings.region  # S3 says nothing for us-east-1
    return Response(document("LocationConstraint", []).replace(b"</LocationConstraint>",
                                                               f"{region}</LocationConstraint>".encode()),
                    media_type="application/xml")


async def _get_versioning(call: Call, store: ObjectStore) -> Response:
    await asyncio.to_thread(store.bucket_created, call.bucket)
    return _xml("VersioningConfiguration", [])


def _int_param(call: Call, name: str, default: int, *, maximum: int) -> int:
    raw = call.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise S3ApiError("InvalidArgument", f"Provided {name} not an integer or within integer range", 400,
                         argument=name, value=raw[:64]) from None
    if value < 0:
        raise S3ApiError("InvalidArgument", f"Argument {name} must be an integer between 0 and 2147483647", 400,
                         argument=name, value=raw[:64])
    return min(value, maximum)


def _token(last: str) -> str:
    return base64.urlsafe_b64encode(last.encode("utf-8")).decode("ascii")


def _untoken(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode("ascii")).decode("utf-8")
    except (binascii.Error, ValueError):
        raise S3ApiError("InvalidArgument", "The continuation token provided is incorrect", 400,
                         argument="continuation-token") from None


async def _list_objects(call: Call, store: ObjectStore) -> Response:
    q = call.query
    v2 = q.get("list-type") == "2"
    if "list-type" in q and not v2:
        raise S3ApiError("InvalidArgument", "Invalid list-type (only 2 is supported).", 400, argument="list-type")
    encoding = q.get("encoding-type")
    if encoding not in (None, "url"):
        raise S3ApiError("InvalidArgument", "Invalid Encoding Method specified in Request", 400,
                         argument="encoding-type")
    enc: Callable[[str], str] = url_encode if encoding == "url" else (lambda s: s)
    prefix, delimiter = q.get("prefix", ""), q.get("delimiter", "")
    max_keys = _int_param(call, "max-keys", 1000, maximum=1000)
    token = q.get("continuation-token")
    after = (_untoken(token) if token else q.get("start-after", "")) if v2 else q.get("marker", "")
    page = await asyncio.to_thread(store.list_keys, call.bucket, prefix=prefix, delimiter=delimiter, after=after,
                                   max_keys=max_keys)
    body: list[Node] = [("Name", call.bucket), ("Prefix", enc(prefix))]
    if v2:
        body += [("KeyCount", len(page.contents) + len(page.prefixes))]
        if token is not None:
            body.append(("ContinuationToken", token))
        if page.truncated and page.last is not None:
            body.append(("NextContinuationToken", _token(page.last)))
        if "start-after" in q:
            body.append(("StartAfter", enc(q["start-after"])))
    else:
        body.append(("Marker", enc(after)))
        if page.truncated and page.last is not None:
            body.append(("NextMarker", enc(page.last)))
    body += [("MaxKeys", max_keys)]
    if delimiter:
        body.append(("Delimiter", enc(delimiter)))
    if encoding:
        body.append(("EncodingType", encoding))
    body.append(("IsTruncated", page.truncated))
    for info in page.contents:
        entry: list[Node] = [("Key", enc(info.key)), ("LastModified", iso_date(info.modified)), ("ETag", _etag(info)),
                             ("Size", info.size), ("StorageClass", "STANDARD")]
        if not v2:
            entry.append(_owner(call.settings))
        body.append(("Contents", entry))
    body += [("CommonPrefixes", [("Prefix", enc(p))]) for p in page.prefixes]
    return _xml("ListBucketResult", body)


async def _delete_objects(call: Call, store: ObjectStore) -> Response:
    root = parse_xml(call.body or b"", "Delete")
    quiet = (child_text(root, "Quiet") or "").strip().lower() == "true"
    objects = children(root, "Object")
    if len(objects) > 1000:
        raise S3ApiError("MalformedXML", "DeleteObjects takes at most 1000 keys per request.", 400)
    keys = [child_text(o, "Key") for o in objects]
    if any(not k for k in keys):
        raise S3ApiError("MalformedXML", "Every <Object> needs a non-empty <Key>.", 400)
    results: list[Node] = []
    for key in keys:
        assert key is not None
        try:
            _check_key(key)
            await asyncio.to_thread(store.delete, call.bucket, key)
            if not quiet:
                results.append(("Deleted", [("Key", key)]))
        except S3ApiError as exc:
            if exc.aws_code == "NoSuchBucket":
                raise
            results.append(("Error", [("Key", key[:1024]), ("Code", exc.aws_code), ("Message", exc.message)]))
    return _xml("DeleteResult", results)


async def _list_uploads(call: Call, store: ObjectStore) -> Response:
    prefix = call.query.get("prefix", "")
    uploads = await asyncio.to_thread(store.uploads_in, call.bucket, prefix)
    return _xml("ListMultipartUploadsResult", [
        ("Bucket", call.bucket), ("Prefix", prefix), ("MaxUploads", 1000), ("IsTruncated", False),
        *[("Upload", [("Key", u.key), ("UploadId", u.id), ("Initiator", [("ID", call.settings.account_id)]),
                      _owner(call.settings), ("StorageClass", "STANDARD"), ("Initiated", iso_date(u.created))])
          for u in uploads]])


# --- objects ---------------------------------------------------------------------------------------


def _metadata(call: Call) -> dict[str, Any]:
    """What PutObject / CreateMultipartUpload store besides the bytes: standard headers and x-amz-meta-*."""
    headers = {name: call.headers[name] for name in _STORED_HEADERS if name in call.headers}
    headers.setdefault("content-type", "binary/octet-stream")
    user = {name[len("x-amz-meta-"):]: value for name, value in call.headers.items()
            if name.startswith("x-amz-meta-")}
    if sum(len(k) + len(v) for k, v in user.items()) > _MAX_META_BYTES:
        raise S3ApiError("MetadataTooLarge", f"Your metadata headers exceed the maximum allowed metadata size "
                         f"({_MAX_META_BYTES} bytes).", 400)
    return {"headers": headers, "user": user}


def _object_headers(info: ObjectInfo) -> dict[str, str]:
    headers = {"ETag": _etag(info), "Last-Modified": http_date(info.modified), "Accept-Ranges": "bytes"}
    for name, value in info.meta.get("headers", {}).items():
        headers[name] = value
    for name, value in info.meta.get("user", {}).items():
        headers[f"x-amz-meta-{name}"] = value
    return headers


async def _receive(call: Call, store: ObjectStore) -> BlobWriter:
    """Stream the request body into a blob writer, checking its size and declared digests."""
    if "aws-chunked" in call.headers.get("content-encoding", "") or "x-amz-decoded-content-length" in call.headers:
        # chunk-framed bodies (trailing checksums): botocore sends them over https only; storing the framing
        # as the object would corrupt it, so say so instead
        raise S3ApiError("NotImplemented", "aws-chunked request bodies are not supported by sdmaker's built-in S3; "
                         "send the payload as is (botocore does over http).", 501)
    declared = call.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > _MAX_OBJECT_BYTES:
        raise S3ApiError("EntityTooLarge", "Your proposed upload exceeds the maximum allowed size (5 GiB).", 400)
    writer = await asyncio.to_thread(store.writer)
    try:
        buffer = bytearray()
        async for chunk in call.request.stream():
            buffer += chunk
            if writer.size + len(buffer) > _MAX_OBJECT_BYTES:
                raise S3ApiError("EntityTooLarge", "Your proposed upload exceeds the maximum allowed size (5 GiB).",
                                 400)
            if len(buffer) >= _FLUSH_BYTES:
                data, buffer = bytes(buffer), bytearray()
                await asyncio.to_thread(writer.write, data)
        if buffer:
            await asyncio.to_thread(writer.write, bytes(buffer))
        _check_digests(call, writer)
    except BaseException:
        await asyncio.to_thread(writer.discard)
        raise
    return writer


def _check_digests(call: Call, writer: BlobWriter) -> None:
    """The body must match a declared X-Amz-Content-SHA256 (what the signature covers) and Content-MD5."""
    sha = call.headers.get("x-amz-content-sha256", "")
    if re.fullmatch(r"[0-9a-fA-F]{64}", sha) and sha.lower() != writer.sha256_so_far():
        raise S3ApiError("XAmzContentSHA256Mismatch", "The provided 'x-amz-content-sha256' header does not match "
                         "what was computed.", 400)
    if (md5 := call.headers.get("content-md5")) is not None:
        try:
            wanted = base64.b64decode(md5, validate=True).hex()
        except (binascii.Error, ValueError):
            raise S3ApiError("InvalidDigest", "The Content-MD5 you specified was invalid.", 400) from None
        if wanted != writer.md5_so_far():
            raise S3ApiError("BadDigest", "The Content-MD5 you specified did not match what we received.", 400)


def _conditions(call: Call) -> tuple[bool, str | None]:
    none_match = call.headers.get("if-none-match")
    if none_match is not None and none_match.strip() != "*":
        raise S3ApiError("NotImplemented", "PutObject supports If-None-Match: * only.", 501)
    return none_match is not None, call.headers.get("if-match")


async def _put_object(call: Call, store: ObjectStore) -> Response:
    meta = _metadata(call)
    if_none_match, if_match = _conditions(call)
    writer = await _receive(call, store)
    info = await asyncio.to_thread(store.put, call.bucket, call.key, writer, meta, if_none_match=if_none_match,
                                   if_match=if_match)
    return Response(status_code=200, headers={"ETag": _etag(info)})


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``a-`` / ``-n`` -> inclusive (start, end); None for forms S3 ignores (several ranges)."""
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", value)
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise _bad_range(size)
        return max(0, size - suffix), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if last and int(last) < start:
        return None  # syntactically invalid: S3 ignores the header
    if start >= size:
        raise _bad_range(size)
    return start, end


def _bad_range(size: int) -> S3ApiError:
    return S3ApiError("InvalidRange", "The requested range is not satisfiable", 416, range_size=size)


def _precondition(call: Call, info: ObjectInfo) -> int | None:
    """304/412 per the conditional GET headers (If-Match and If-None-Match win over the date forms)."""
    h = call.headers

    def _since(name: str) -> float | None:
        try:
            return parsedate_to_datetime(h[name]).timestamp() if name in h else None
        except (TypeError, ValueError):
            return None

    if "if-match" in h:
        if not any(t.strip().strip('"') in ("*", info.etag) for t in h["if-match"].split(",")):
            return 412
    elif (t := _since("if-unmodified-since")) is not None and int(info.modified) > t:
        return 412
    if "if-none-match" in h:
        if any(t.strip().strip('"') in ("*", info.etag) for t in h["if-none-match"].split(",")):
            return 304
    elif (t := _since("if-modified-since")) is not None and int(info.modified) <= t:
        return 304
    return None


async def _get_object(call: Call, store: ObjectStore) -> Response:
    info, fh = await asyncio.to_thread(store.open, call.bucket, call.key)
    try:
        headers = _object_headers(info)
        for param, header in _OVERRIDES.items():
            if param in call.query:
                headers[header] = call.query[param]
        status = _precondition(call, info)
        if status == 412:
            raise S3ApiError("PreconditionFailed", "At least one of the pre-conditions you specified did not hold",
                             412, bucket=call.bucket, key=call.key)
        if status == 304:
            fh.close()
            return Response(status_code=304, headers={"ETag": headers["ETag"],
                                                      "Last-Modified": headers["Last-Modified"]})
        start, end, status = 0, info.size - 1, 200
        if "range" in call.headers and (span := _parse_range(call.headers["range"], info.size)) is not None:
            start, end = span
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{info.size}"
        headers["Content-Length"] = str(max(0, end - start + 1))
    except BaseException:
        fh.close()
        raise
    if call.method == "HEAD":
        fh.close()
        return Response(status_code=status, headers=headers)
    # the stored Content-Type goes back byte for byte (a media_type would get "; charset=utf-8" added)
    return StreamingResponse(_read_span(fh, start, end - start + 1), status_code=status, headers=headers)


async def _read_span(fh: IO[bytes], start: int, length: int) -> AsyncIterator[bytes]:
    try:
        await asyncio.to_thread(fh.seek, start)
        while length > 0:
            chunk = await asyncio.to_thread(fh.read, min(_READ_CHUNK, length))
            if not chunk:
                break
            length -= len(chunk)
            yield chunk
    finally:
        fh.close()


async def _delete_object(call: Call, store: ObjectStore) -> Response:
    await asyncio.to_thread(store.delete, call.bucket, call.key)
    return Response(status_code=204)


def _copy_source(call: Call) -> tuple[str, str]:
    raw = unquote(call.headers["x-amz-copy-source"].split("?versionId=", 1)[0])
    bucket, _, key = raw.lstrip("/").partition("/")
    if not bucket or not key:
        raise S3ApiError("InvalidArgument", "Copy Source must mention the source bucket and key: "
                         "sourcebucket/sourcekey", 400, argument="x-amz-copy-source")
    _check_key(key)
    return bucket, key


async def _copy_object(call: Call, store: ObjectStore) -> Response:
    src_bucket, src_key = _copy_source(call)
    replace = call.headers.get("x-amz-metadata-directive", "COPY").upper()
    if replace not in ("COPY", "REPLACE"):
        raise S3ApiError("InvalidArgument", "Unknown metadata directive.", 400,
                         argument="x-amz-metadata-directive")
    if replace == "COPY" and (src_bucket, src_key) == (call.bucket, call.key):
        raise S3ApiError("InvalidRequest", "This copy request is illegal because it is trying to copy an object to "
                         "itself without changing the object's metadata, storage class, website redirect location "
                         "or encryption attributes.", 400)
    meta = _metadata(call) if replace == "REPLACE" else None
    info = await asyncio.to_thread(store.copy, src_bucket, src_key, call.bucket, call.key, meta)
    return _xml("CopyObjectResult", [("LastModified", iso_date(info.modified)), ("ETag", _etag(info))])


# --- multipart uploads -----------------------------------------------------------------------------


async def _create_upload(call: Call, store: ObjectStore) -> Response:
    meta = _metadata(call)
    upload = await asyncio.to_thread(store.create_upload, call.bucket, call.key, meta)
    return _xml("InitiateMultipartUploadResult", [("Bucket", call.bucket), ("Key", call.key), ("UploadId", upload)])


def _part_number(call: Call) -> int:
    raw = call.query.get("partNumber", "")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PART_NUMBER:
        raise S3ApiError("InvalidArgument", f"Part number must be an integer between 1 and {MAX_PART_NUMBER}, "
                         "inclusive", 400, argument="partNumber", value=raw[:32])
    return int(raw)


async def _upload_part(call: Call, store: ObjectStore) -> Response:
    number = _part_number(call)
    upload_id = call.query["uploadId"]
    await asyncio.to_thread(store.upload, call.bucket, call.key, upload_id)  # before reading gigabytes
    writer = await _receive(call, store)
    part = await asyncio.to_thread(store.put_part, call.bucket, call.key, upload_id, number, writer)
    return Response(status_code=200, headers={"ETag": f'"{part.etag}"'})


async def _copy_part(call: Call, store: ObjectStore) -> Response:
    number = _part_number(call)
    src_bucket, src_key = _copy_source(call)
    span = None
    if (raw := call.headers.get("x-amz-copy-source-range")) is not None:
        info = await asyncio.to_thread(store.head, src_bucket, src_key)
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", raw.strip())
        if match is None or int(match[1]) > int(match[2]) or int(match[2]) >= info.size:
            raise S3ApiError("InvalidArgument", "The x-amz-copy-source-range value must be of the form "
                             "bytes=first-last where first and last are the zero-based offsets of the first and "
                             "last bytes to copy", 400, argument="x-amz-copy-source-range")
        span = (int(match[1]), int(match[2]))
    part = await asyncio.to_thread(store.copy_part, call.bucket, call.key, call.query["uploadId"], number,
                                   src_bucket, src_key, span)
    return _xml("CopyPartResult", [("LastModified", iso_date(part.modified)), ("ETag", f'"{part.etag}"')])


async def _complete_upload(call: Call, store: ObjectStore) -> Response:
    root = parse_xml(call.body or b"", "CompleteMultipartUpload")
    wanted: list[tuple[int, str]] = []
    for part in children(root, "Part"):
        number, etag = child_text(part, "PartNumber"), child_text(part, "ETag")
        if number is None or not number.strip().isdigit() or etag is None:
            raise S3ApiError("MalformedXML", "Every <Part> needs a <PartNumber> and an <ETag>.", 400)
        wanted.append((int(number), etag.strip()))
    if_none_match, _ = _conditions(call)
    info = await asyncio.to_thread(store.complete_upload, call.bucket, call.key, call.query["uploadId"], wanted,
                                   if_none_match=if_none_match)
    location = f"{call.settings.builtin_s3_url}/{call.bucket}/{url_encode(call.key)}"
    return _xml("CompleteMultipartUploadResult", [("Location", location), ("Bucket", call.bucket),
                                                  ("Key", call.key), ("ETag", _etag(info))])


async def _abort_upload(call: Call, store: ObjectStore) -> Response:
    await asyncio.to_thread(store.abort_upload, call.bucket, call.key, call.query["uploadId"])
    return Response(status_code=204)


async def _list_parts(call: Call, store: ObjectStore) -> Response:
    upload_id = call.query["uploadId"]
    marker = _int_param(call, "part-number-marker", 0, maximum=MAX_PART_NUMBER)
    max_parts = _int_param(call, "max-parts", 1000, maximum=1000)
    parts = [p for p in await asyncio.to_thread(store.parts, call.bucket, call.key, upload_id) if p.number > marker]
    page, truncated = parts[:max_parts], len(parts) > max_parts
    body: list[Node] = [("Bucket", call.bucket), ("Key", call.key), ("UploadId", upload_id),
                        ("PartNumberMarker", marker), ("MaxParts", max_parts), ("IsTruncated", truncated)]
    if page:
        body.append(("NextPartNumberMarker", page[-1].number))
    body += [("Part", [("PartNumber", p.number), ("LastModified", iso_date(p.modified)), ("ETag", f'"{p.etag}"'),
                       ("Size", p.size)]) for p in page]
    return _xml("ListPartsResult", body)
