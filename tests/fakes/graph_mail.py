"""Microsoft Graph's mail rules as the Graph fake applies them, without any I/O.

This module owns what Graph (Exchange Online behind it) decides about a message:
the strict base64 of the MIME form, the recipients it takes from the To, Cc and
Bcc headers or from the JSON recipient fields, the Bcc header it removes from the
delivered copy, the attachments it finds, the validation of the JSON ``message``
resource (unknown properties, ``internetMessageHeaders``, ``fileAttachment``) and
the shape of every Graph error body
(``{"error": {"code", "message", "innerError": {...}}}``).
"""

import base64
import binascii
import hashlib
import re
import time
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesParser

REQUEST_LIMIT = 4 * 1024 * 1024  # a Graph request body may be 4 MB, base64 included
UPLOAD_CHUNK_UNIT = 320 * 1024  # every upload fragment but the last: a multiple of 320 KiB
UPLOAD_SESSION_MIN = 3 * 1024 * 1024  # smaller attachments go through POST .../attachments
UPLOAD_SESSION_MAX = 150 * 1024 * 1024
FILE_ATTACHMENT = "#microsoft.graph.fileAttachment"

MESSAGE_PROPERTIES = frozenset(
    """@odata.type @odata.context @odata.etag attachments bccRecipients body bodyPreview
    categories ccRecipients changeKey conversationId conversationIndex createdDateTime
    extensions flag from hasAttachments id importance inferenceClassification
    internetMessageHeaders internetMessageId isDeliveryReceiptRequested isDraft isRead
    isReadReceiptRequested lastModifiedDateTime multiValueExtendedProperties parentFolderId
    receivedDateTime replyTo sender sentDateTime singleValueExtendedProperties subject
    toRecipients uniqueBody webLink""".split()
)
ATTACHMENT_PROPERTIES = frozenset(
    """@odata.type @odata.mediaContentType contentBytes contentId contentLocation contentType
    id isInline lastModifiedDateTime name size""".split()
)
RECIPIENT_FIELDS = ("toRecipients", "ccRecipients", "bccRecipients")
# PidTagDeleteAfterSubmit: a draft carrying it is not kept in Sent Items once sent
DELETE_AFTER_SUBMIT = "boolean 0x0e01"


class GraphError(Exception):
    """A Graph answer other than success: status, error code, message, extra headers."""

    def __init__(self, status, code, message, headers=None, inner=True):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.inner = inner


def error_body(code, message, request_id, client_request_id, now, inner=True):
    body = {"code": code, "message": message}
    if inner:
        body["innerError"] = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)),
            "request-id": request_id,
            "client-request-id": client_request_id,
        }
    return {"error": body}


def bad_json():
    return GraphError(
        400,
        "BadRequest",
        "Unable to read JSON request payload. Please ensure Content-Type header is set and "
        "payload is of valid JSON format.",
    )


def body_read(message):
    return GraphError(400, "RequestBodyRead", message)


def unknown_property(name, type_name):
    return body_read(
        f"The property '{name}' does not exist on type '{type_name}'. Make sure to only use "
        "property names that are defined by the type or mark the type as open type."
    )


def no_recipients():
    return GraphError(
        400,
        "ErrorInvalidRecipients",
        "At least one recipient is not valid., A message can't be sent because it contains "
        "no recipients.",
    )


def unresolved_recipient(address):
    return GraphError(
        400,
        "ErrorInvalidRecipients",
        f"At least one recipient is not valid., Recipient '{address}' is not resolved. All "
        "recipients must be resolved before a message can be submitted.",
    )


def send_as_denied():
    return GraphError(
        403,
        "ErrorSendAsDenied",
        "The user account which was used to submit this request does not have the right to "
        "send mail on behalf of the specified sending account., Cannot submit message.",
    )


def too_large():
    return GraphError(413, "RequestEntityTooLarge", "The maximum request length supported is 4MB.")


def as_bool(value):
    """OData reads ``true``/``false`` literals in strings too (the docs' own example does)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise body_read(f"Cannot convert the literal '{value}' to the expected type 'Edm.Boolean'.")


# ---------------------------------------------------------------- attachments


@dataclass
class Attachment:
    name: str
    content_type: str
    content: bytes
    is_inline: bool = False
    content_id: str = None
    source: str = "mime"  # mime | json | attachments | upload
    id: str = None
    size: int = field(init=False)
    sha256: str = field(init=False)

    def __post_init__(self):
        self.size = len(self.content)
        self.sha256 = hashlib.sha256(self.content).hexdigest()

    def forget_content(self):
        """Keep the size and hash only (benchmarks that send gigabytes)."""
        self.content = None

    def resource(self, with_content=True):
        """The fileAttachment Graph returns for it."""
        out = {
            "@odata.type": FILE_ATTACHMENT,
            "@odata.mediaContentType": self.content_type,
            "id": self.id,
            "lastModifiedDateTime": None,
            "name": self.name,
            "contentType": self.content_type,
            "size": self.size,
            "isInline": self.is_inline,
            "contentId": self.content_id,
            "contentLocation": None,
        }
        if with_content and self.content is not None:
            out["contentBytes"] = base64.b64encode(self.content).decode("ascii")
        return out

    def record(self, with_content=True):
        out = {
            "name": self.name,
            "contentType": self.content_type,
            "isInline": self.is_inline,
            "contentId": self.content_id,
            "size": self.size,
            "sha256": self.sha256,
            "source": self.source,
        }
        if with_content and self.content is not None:
            out["content_b64"] = base64.b64encode(self.content).decode("ascii")
        return out


def file_attachment(resource, source):
    """An Attachment from a JSON fileAttachment, validated as Graph does."""
    if not isinstance(resource, dict):
        raise body_read(
            "An unexpected 'PrimitiveValue' node was found when reading from the JSON reader. "
            "A 'StartObject' node was expected."
        )
    kind = resource.get("@odata.type")
    if kind is None:
        for name in resource:
            if name not in (
                "@odata.type",
                "id",
                "name",
                "contentType",
                "size",
                "isInline",
                "lastModifiedDateTime",
            ):
                raise unknown_property(name, "microsoft.graph.attachment")
        raise body_read("The attachment type is missing: set '@odata.type'.")
    if kind != FILE_ATTACHMENT:
        raise GraphError(
            400,
            "ErrorInvalidRequest",
            f"The fake supports only fileAttachment, not '{kind}'.",
        )
    for name in resource:
        if name not in ATTACHMENT_PROPERTIES:
            raise unknown_property(name, "microsoft.graph.fileAttachment")
    raw = resource.get("contentBytes")
    if not isinstance(raw, str):
        raise GraphError(400, "ErrorInvalidRequest", "The property 'contentBytes' is required.")
    try:
        content = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise body_read(
            f"Cannot convert the literal '{raw[:40]}' to the expected type 'Edm.Binary'."
        ) from None
    is_inline = as_bool(resource.get("isInline", False))
    return Attachment(
        name=resource.get("name"),
        content_type=resource.get("contentType") or "application/octet-stream",
        content=content,
        is_inline=is_inline,
        content_id=resource.get("contentId"),
        source=source,
    )


# ---------------------------------------------------------------- MIME form


def decode_mime_base64(body):
    """The MIME of a ``text/plain`` request, decoded as .NET's Convert.FromBase64String does.

    Whitespace (line breaks included) is ignored; anything else outside the
    alphabet, or a missing ``=`` padding, is an error.
    """
    compact = re.sub(rb"[ \t\r\n]", b"", body)
    try:
        if not compact:
            raise ValueError("empty")
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise GraphError(
            400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content."
        ) from None


@dataclass
class ParsedMime:
    sender: str
    to: list
    cc: list
    bcc: list
    subject: str
    message_id: str
    attachments: list = field(default_factory=list)


def parse_mime(raw):
    """What Exchange reads from a MIME message: From, To/Cc/Bcc, Subject, attachments."""
    message = BytesParser(policy=policy.default).parsebytes(raw)

    def addresses(name):
        found = []
        try:
            # the standard library's parser may fail as it reads (IndexError on a value
            # that ends in "<"): Exchange cannot resolve such a recipient either
            headers = message.get_all(name) or ()
        except Exception:
            raw = [v for k, v in message.raw_items() if k.lower() == name.lower()]
            raise unresolved_recipient(str(raw[0]).strip() if raw else name) from None
        for header in headers:
            try:
                found.extend(a.addr_spec for a in header.addresses if a.addr_spec)
            except (AttributeError, TypeError, ValueError, IndexError):
                raise unresolved_recipient(str(header)) from None
        return found

    senders = addresses("From")
    return ParsedMime(
        sender=senders[0] if senders else None,
        to=addresses("To"),
        cc=addresses("Cc"),
        bcc=addresses("Bcc"),
        subject=str(message["Subject"]) if message["Subject"] is not None else None,
        message_id=str(message["Message-ID"]).strip() if message["Message-ID"] else None,
        attachments=list(_mime_attachments(message)),
    )


def _mime_attachments(message):
    for part in message.walk():
        if part.is_multipart():
            continue
        disposition = part.get_content_disposition()
        filename = part.get_filename()
        content_id = part.get("Content-ID")
        body_like = part.get_content_maintype() == "text" and not filename
        if disposition != "attachment" and not filename and not (content_id and not body_like):
            continue
        yield Attachment(
            name=filename,
            content_type=part.get_content_type(),
            content=part.get_payload(decode=True) or b"",
            is_inline=disposition == "inline" or (disposition is None and bool(content_id)),
            content_id=str(content_id).strip().strip("<>") if content_id else None,
            source="mime",
        )


def strip_bcc(raw):
    """The MIME as delivered: the Bcc header (and its folded lines) gone, every other byte kept."""
    out, dropping = [], False
    for match in re.finditer(rb"[^\n]*(?:\n|$)", raw):
        line = match.group()
        if not line:
            break
        if line in (b"\n", b"\r\n"):  # the blank line: the body follows untouched
            out.append(raw[match.start() :])
            break
        if line[:1] in (b" ", b"\t"):  # a folded continuation of the header above
            if not dropping:
                out.append(line)
            continue
        dropping = re.match(rb"(?i)bcc[ \t]*:", line) is not None
        if not dropping:
            out.append(line)
    return b"".join(out)


# ---------------------------------------------------------------- JSON form


def is_address(text):
    return isinstance(text, str) and re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", text) is not None


def recipient_list(value, name):
    """Addresses from a Graph recipient collection (``[{"emailAddress": {"address"}}]``)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise body_read(
            f"An unexpected 'StartObject' node was found for property named '{name}' when "
            "reading from the JSON reader. A 'StartArray' node was expected."
        )
    out = []
    for item in value:
        if not isinstance(item, dict):
            raise body_read(f"Invalid item in '{name}'.")
        for key in item:
            if key != "emailAddress":
                raise unknown_property(key, "microsoft.graph.recipient")
        email = item.get("emailAddress")
        if not isinstance(email, dict):
            raise unresolved_recipient("")
        for key in email:
            if key not in ("address", "name"):
                raise unknown_property(key, "microsoft.graph.emailAddress")
        address = email.get("address")
        if not is_address(address):
            raise unresolved_recipient(address or email.get("name") or "")
        out.append({"address": address, "name": email.get("name")})
    return out


def single_recipient(value, name):
    if value is None:
        return None
    found = recipient_list([value], name)
    return found[0]


def message_headers(value):
    """``internetMessageHeaders``: at most 5, every name ``x-``/``X-``."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise body_read("A 'StartArray' node was expected for 'internetMessageHeaders'.")
    if len(value) > 5:
        raise GraphError(
            400,
            "InvalidInternetMessageHeader",
            "Maximum number of headers in one message should be less than or equal to 5.",
        )
    out = []
    for item in value:
        if not isinstance(item, dict):
            raise body_read("Invalid item in 'internetMessageHeaders'.")
        for key in item:
            if key not in ("name", "value"):
                raise unknown_property(key, "microsoft.graph.internetMessageHeader")
        name = item.get("name")
        if not isinstance(name, str) or not name.lower().startswith("x-"):
            raise GraphError(
                400,
                "InvalidInternetMessageHeader",
                f"The internet message header name '{name}' should start with 'x-' or 'X-'.",
            )
        out.append({"name": name, "value": item.get("value")})
    return out


def message_fields(resource, allow_attachments=True):
    """Validate a JSON ``message`` resource; return the fields the fake keeps, normalised.

    Only the keys present in ``resource`` appear in the result, so a PATCH can
    merge it over a draft.
    """
    if not isinstance(resource, dict):
        raise body_read("A 'StartObject' node was expected for the message.")
    for name in resource:
        if name not in MESSAGE_PROPERTIES:
            raise unknown_property(name, "microsoft.graph.message")
    out = {}
    for name in RECIPIENT_FIELDS + ("replyTo",):
        if name in resource:
            out[name] = recipient_list(resource[name], name)
    for name in ("from", "sender"):
        if name in resource:
            out[name] = single_recipient(resource[name], name)
    if "subject" in resource:
        if resource["subject"] is not None and not isinstance(resource["subject"], str):
            raise body_read("Cannot convert a value to 'Edm.String' for 'subject'.")
        out["subject"] = resource["subject"]
    if "body" in resource:
        body = resource["body"]
        if not isinstance(body, dict):
            raise body_read("A 'StartObject' node was expected for 'body'.")
        for key in body:
            if key not in ("contentType", "content"):
                raise unknown_property(key, "microsoft.graph.itemBody")
        kind = body.get("contentType", "text")
        if not isinstance(kind, str) or kind.lower() not in ("text", "html"):
            raise body_read(f"Requested value '{kind}' was not found.")
        out["body"] = {"contentType": kind.lower(), "content": body.get("content") or ""}
    if "internetMessageHeaders" in resource:
        out["internetMessageHeaders"] = message_headers(resource["internetMessageHeaders"])
    if "internetMessageId" in resource:
        out["internetMessageId"] = resource["internetMessageId"]
    if "singleValueExtendedProperties" in resource:
        props = resource["singleValueExtendedProperties"]
        if not isinstance(props, list) or not all(isinstance(p, dict) for p in props):
            raise body_read("A 'StartArray' node was expected for 'singleValueExtendedProperties'.")
        out["singleValueExtendedProperties"] = props
    if "attachments" in resource:
        if not allow_attachments:
            raise GraphError(400, "ErrorInvalidRequest", "Attachments cannot be set with PATCH.")
        if not isinstance(resource["attachments"], list):
            raise body_read("A 'StartArray' node was expected for 'attachments'.")
        out["attachments"] = [file_attachment(a, "json") for a in resource["attachments"]]
    return out


def deletes_after_submit(fields):
    for prop in fields.get("singleValueExtendedProperties") or ():
        if str(prop.get("id", "")).lower() == DELETE_AFTER_SUBMIT:
            return str(prop.get("value", "")).lower() == "true"
    return False


def addresses(recipients):
    return [r["address"] for r in recipients or ()]


def unique(addresses_):
    seen, out = set(), []
    for address in addresses_:
        if address.lower() not in seen:
            seen.add(address.lower())
            out.append(address)
    return out


def encoded_size(body_text, attachments):
    """About what Exchange counts against the mailbox's send size: base64 inflates attachments."""
    return len((body_text or "").encode("utf-8")) + sum(
        4 * ((a.size + 2) // 3) for a in attachments
    )
