"""Hypothesis strategies for hostile MIME, shared by the MIME fuzzing tests.

``mime_message`` draws messages with malformed multiparts, missing boundaries,
huge headers, broken encodings, 8-bit headers in legacy charsets and odd
attachment names; ``line`` draws one line without CR, LF or NUL; ``dot_stuff``
prepares a message for the SMTP DATA phase.
"""

from hypothesis import strategies as st


def line(max_size=200):
    return st.binary(max_size=max_size).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b""))


header_values = st.one_of(
    line(),
    st.sampled_from([
        b"=?iso-8859-1?q?caf=E9?=", b"=?utf-8?b?broken", b"=?koi8-r?B?8NLJ18XU?=",
        b"caf\xe9 cr\xe8me (latin-1)", b"\xd0\xbf\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82",
        b'attachment; filename="../../etc/passwd"', b"attachment; filename*=UTF-8''%E2%82%AC.pdf",
        b'attachment; filename="a\\"b.txt"', b"multipart/mixed; boundary=", b"multipart/mixed",
        b'multipart/mixed; boundary="' + b"b" * 300 + b'"', b"text/plain; charset=unknown-8bit",
        b"base64", b"quoted-printable", b"x-uuencode",
    ]),
)
header = st.tuples(st.sampled_from([b"Subject", b"Content-Type", b"Content-Disposition",
                                    b"Content-Transfer-Encoding", b"X-Odd", b"MIME-Version",
                                    b"Content-ID"]), header_values)
part = st.tuples(st.lists(header, max_size=4), st.lists(line(300), max_size=8))


@st.composite
def mime_message(draw):
    boundary = draw(st.sampled_from([b"b1", b"==_x", b"", b"--", b"b1 b2"]))
    headers = [(b"From", b"fuzz@example.com"), (b"To", b"someone@example.com")]
    headers += draw(st.lists(header, max_size=6))
    if draw(st.booleans()):
        # a huge header, folded or as one long line (under smtp.max_line_length)
        value = b"v" * draw(st.integers(1000, 20000))
        if draw(st.booleans()):
            value = b"\r\n ".join(value[i:i + 70] for i in range(0, len(value), 70))
        headers.append((b"X-Huge", value))
    out = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    out += b"Content-Type: multipart/mixed; boundary=\"" + boundary + b"\"\r\n\r\n"
    for hs, body in draw(st.lists(part, max_size=4)):
        if draw(st.booleans()):
            out += b"--" + boundary + b"\r\n"
        out += b"".join(n + b": " + v + b"\r\n" for n, v in hs) + b"\r\n"
        out += b"\r\n".join(body) + b"\r\n"
    if draw(st.booleans()):
        out += b"--" + boundary + b"--\r\n"
    out += draw(line(500)) + b"\r\n"
    return out


def dot_stuff(data):
    return data.replace(b"\r\n.", b"\r\n..") if not data.startswith(b".") else b"." + \
        data.replace(b"\r\n.", b"\r\n..")
