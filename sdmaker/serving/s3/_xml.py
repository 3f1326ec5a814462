"""S3's XML: the documents the built-in S3 answers with, and the few request bodies it parses.

Answers follow the S3 API reference shapes (namespace ``http://s3.amazonaws.com/doc/2006-03-01/``), which
botocore parses by element name. Request bodies (CompleteMultipartUpload, Delete, CreateBucketConfiguration)
are small: parsed only below :data:`MAX_XML_BYTES`, and any DTD or entity declaration is refused before
parsing (no entity expansion, no external fetches), so malformed or hostile XML is a ``MalformedXML`` 400.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import escape

from sdmaker.errors import S3ApiError

__all__ = ["MAX_XML_BYTES", "child_text", "children", "document", "error_document", "http_date", "iso_date", "parse_xml",
           "url_encode"]

NAMESPACE = "http://s3.amazonaws.com/doc/2006-03-01/"
#: The largest XML request body parsed (a DeleteObjects of 1000 keys of 1024 bytes fits).
MAX_XML_BYTES = 2 * 1024 * 1024

Node = tuple[str, Any]  # (tag, text | list of nodes | None)


def iso_date(ts: float) -> str:
    """``2026-12-02T00:45:14.000Z``: the form S3 lists dates in."""
    when = dt.datetime.fromtimestamp(ts, dt.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def http_date(ts: float) -> str:
    """``Wed, 02 Dec 2026 00:45:14 GMT`` (``Last-Modified``)."""
    return email.utils.formatdate(ts, usegmt=True)


def url_encode(text: str) -> str:
    """``EncodingType=url`` form of a key or prefix (botocore decodes it with ``unquote_plus``)."""
    return quote(text, safe="/-_.~")


def _render(node: Node, out: list[str]) -> None:
    tag, value = node
    if value is None:
        out.append(f"<{tag}/>")
    elif isinstance(value, list):
        out.append(f"<{tag}>")
        for child in value:
            _render(child, out)
        out.append(f"</{tag}>")
    else:
        text = "true" if value is True else "false" if value is False else str(value)
        out.append(f"<{tag}>{escape(text)}</{tag}>")


def document(root: str, children: Iterable[Node]) -> bytes:
    """``<root xmlns=...>children</root>`` with an XML declaration, UTF-8."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>\n', f'<{root} xmlns="{NAMESPACE}">']
    for child in children:
        _render(child, out)
    out.append(f"</{root}>")
    return "".join(out).encode("utf-8")


def error_document(exc: S3ApiError, resource: str, request_id: str) -> bytes:
    """S3's ``<Error>`` body: Code, Message, the structured fields S3 also names, Resource, RequestId."""
    names = {"bucket": "BucketName", "key": "Key", "upload_id": "UploadId", "condition": "Condition",
             "part_number": "PartNumber", "min_size_allowed": "MinSizeAllowed", "argument": "ArgumentName",
             "value": "ArgumentValue"}
    fields = [(names[k], v) for k, v in exc.fields.items() if k in names and v is not None]
    children: list[Node] = [("Code", exc.aws_code), ("Message", exc.message), *fields, ("Resource", resource),
                            ("RequestId", request_id)]
    out = ['<?xml version="1.0" encoding="UTF-8"?>\n', "<Error>"]
    for child in children:
        _render(child, out)
    out.append("</Error>")
    return "".join(out).encode("utf-8")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse_xml(body: bytes, root: str) -> ET.Element:
    """Parse a request body whose root element must be ``root`` (any namespace); MalformedXML otherwise."""
    if len(body) > MAX_XML_BYTES:
        raise S3ApiError("MaxMessageLengthExceeded", f"Your request was too big (XML bodies are limited to "
                         f"{MAX_XML_BYTES} bytes).", 400)
    if b"<!" in body:  # DOCTYPE / ENTITY: never expand entities or fetch DTDs
        raise S3ApiError("MalformedXML", "The XML you provided was not well-formed or did not validate against "
                         "our published schema (declarations are not accepted).", 400)
    try:
        element = ET.fromstring(body)
    except (ET.ParseError, ValueError):
        raise S3ApiError("MalformedXML", "The XML you provided was not well-formed or did not validate against "
                         "our published schema.", 400) from None
    if _local(element.tag) != root:
        raise S3ApiError("MalformedXML", f"The XML you provided was not well-formed or did not validate against "
                         f"our published schema (expected <{root}>).", 400)
    return element


def children(element: ET.Element, tag: str) -> list[ET.Element]:
    """Direct children named ``tag`` (namespace ignored)."""
    return [c for c in element if _local(c.tag) == tag]


def child_text(element: ET.Element, tag: str) -> str | None:
    found = children(element, tag)
    return (found[0].text or "") if found else None
