"""8-bit to 7-bit conversion for servers without 8BITMIME (issue 7 item 23)."""

from __future__ import annotations

import email
import email.policy

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferrymail.mime import DowngradeError, to_7bit


def parts(data: bytes) -> list[email.message.EmailMessage]:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    return [p for p in msg.walk() if not p.is_multipart()]


MIXED = ("From: a@example.com\r\nSubject: plain ascii\r\nMIME-Version: 1.0\r\n"
         "Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\n"
         "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
         "caf\u00e9 = ok\r\n.line\r\n--b\r\nContent-Type: application/octet-stream\r\n"
         "Content-Transfer-Encoding: binary\r\n\r\n\u00ff\u00fe\r\n--b\r\n"
         "Content-Type: text/plain\r\n\r\nascii part\r\n--b--\r\n").encode()


def test_text_to_quoted_printable_other_to_base64_ascii_kept():
    out = to_7bit(MIXED)
    assert out.isascii() and b"\r\n" in out and b"\n" not in out.replace(b"\r\n", b"")
    text, binary, ascii_part = parts(out)
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert text.get_content() == "caf\u00e9 = ok\r\n.line"
    assert binary["Content-Transfer-Encoding"] == "base64"
    assert binary.get_content() == "\u00ff\u00fe".encode()
    assert ascii_part.get_content() == "ascii part"
    assert "Content-Transfer-Encoding" not in ascii_part
    assert out.startswith(b"From: a@example.com\r\nSubject: plain ascii\r\n")


def test_message_without_mime_gets_a_mime_header():
    out = to_7bit("Subject: x\r\n\r\nh\u00e9llo\r\n".encode())
    assert out == (b"Subject: x\r\nMIME-Version: 1.0\r\n"
                   b"Content-Type: text/plain; charset=\"unknown-8bit\"\r\n"
                   b"Content-Transfer-Encoding: quoted-printable\r\n\r\nh=C3=A9llo\r\n")


def test_nested_message_is_relabelled_7bit():
    inner = "Subject: inner\r\nContent-Transfer-Encoding: 8bit\r\n\r\ngr\u00fc\u00df\r\n"
    outer = ("MIME-Version: 1.0\r\nContent-Type: message/rfc822\r\n"
             "Content-Transfer-Encoding: 8bit\r\n\r\n" + inner).encode()
    out = to_7bit(outer)
    assert out.isascii() and b"Content-Transfer-Encoding: 7bit" in out
    assert b"gr=C3=BC=C3=9F" in out


def test_ascii_is_returned_unchanged():
    data = b"Subject: x\r\n\r\nplain\r\n"
    assert to_7bit(data) is data


@pytest.mark.parametrize("data, words", [
    (b"Content-Type: multipart/signed; protocol=\"application/pgp-signature\"; boundary=b\r\n"
     b"\r\n--b\r\nContent-Type: text/plain\r\n\r\ncaf\xc3\xa9\r\n--b--\r\n", "multipart/signed"),
    (b"Content-Type: multipart/encrypted; boundary=b\r\n\r\n--b\r\n\r\n\xff\r\n--b--\r\n",
     "multipart/encrypted"),
    (b"Content-Type: application/pkcs7-mime; smime-type=signed-data\r\n"
     b"Content-Transfer-Encoding: binary\r\n\r\n\xff\xfe\r\n", "application/pkcs7-mime"),
    (b"Subject: caf\xc3\xa9\r\n\r\nx\r\n", "SMTPUTF8"),
    (b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n"
     b"\r\n\xff\xff\r\n", "already labelled"),
])
def test_what_cannot_be_converted_says_why(data, words):
    with pytest.raises(DowngradeError, match=words):
        to_7bit(data)


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                      blacklist_characters="\r\n"), max_size=200),
       st.integers(min_value=0, max_value=4))
def test_text_content_survives_conversion(line, n):
    body = "\r\n".join([line] * (n + 1)) + "\r\n"
    data = ("MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n" + body).encode()
    out = to_7bit(data)
    assert out.isascii()
    (part,) = parts(out)
    assert part.get_content().replace("\r\n", "\n") == body.replace("\r\n", "\n")
