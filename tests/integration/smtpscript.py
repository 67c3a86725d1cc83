"""A small scripted SMTP server for client tests where smtp-sink cannot script the replies.

It runs in the test's own event loop, answers each command from its script, supports
STARTTLS with a given server context, can hold MAIL/RCPT replies until DATA (a client that
does not pipeline then stalls), and records what each session sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Received:
    mail: str
    rcpts: list[str]
    data: bytes  # unstuffed, CRLF line endings kept
    tls: bool


@dataclass
class Session:
    peer: tuple
    commands: list[str] = field(default_factory=list)
    messages: list[Received] = field(default_factory=list)
    tls: bool = False


def _reply(text: str) -> bytes:
    """``"250 ok"`` or a multi-line ``"250-a\\n250 b"`` as wire bytes."""
    return b"".join(line.encode() + b"\r\n" for line in text.split("\n"))


class ScriptedSMTP:
    """``async with ScriptedSMTP(...) as srv:`` then connect to ``srv.host:srv.port``."""

    def __init__(self, *, host: str = "127.0.0.1", banner: str | None = "220 scripted ESMTP",
                 extensions: tuple[str, ...] = ("PIPELINING", "8BITMIME", "SIZE 10000000",
                                                "ENHANCEDSTATUSCODES"),
                 ehlo: str | None = None, helo: str = "250 scripted",
                 mail: Callable[[str], str] = lambda cmd: "250 2.1.0 sender ok",
                 rcpt: Callable[[str], str] = lambda addr: "250 2.1.5 recipient ok",
                 data: str = "354 go ahead", eod: str = "250 2.0.0 queued as 42",
                 starttls: str = "220 2.0.0 ready to start TLS",
                 tls_context: ssl.SSLContext | None = None, hold_until_data: bool = False,
                 drop_on: str | None = None, extra_after_starttls: bytes = b"",
                 rset: str = "250 2.0.0 reset") -> None:
        self.host = host
        self.port = 0
        self.banner = banner
        self.extensions = extensions
        self.ehlo = ehlo
        self.helo = helo
        self.mail = mail
        self.rcpt = rcpt
        self.data = data
        self.eod = eod
        self.starttls = starttls
        self.tls_context = tls_context
        self.hold_until_data = hold_until_data
        self.drop_on = drop_on
        self.extra_after_starttls = extra_after_starttls
        self.rset = rset
        self.sessions: list[Session] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> ScriptedSMTP:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t
        await self._server.wait_closed()

    def _ehlo_reply(self, session: Session) -> str:
        if self.ehlo is not None:
            return self.ehlo
        exts = list(self.extensions)
        if self.tls_context is not None and not session.tls:
            exts.append("STARTTLS")
        lines = ["scripted greets you", *exts]
        return "\n".join(f"250{'-' if i < len(lines) - 1 else ' '}{x}"
                         for i, x in enumerate(lines))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        session = Session(writer.get_extra_info("peername"))
        self.sessions.append(session)
        try:
            await self._session(session, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _session(self, s: Session, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        if self.banner is None:
            await asyncio.sleep(3600)  # a silent MX
            return
        writer.write(_reply(self.banner))
        if not self.banner.startswith("220"):
            await writer.drain()
            return
        held: list[bytes] = []
        mail, rcpts, ok_rcpts = "", [], 0
        while True:
            raw = await reader.readline()
            if not raw:
                return
            cmd = raw.decode("utf-8", "replace").rstrip("\r\n")
            s.commands.append(cmd)
            verb = cmd.split(" ", 1)[0].upper()
            if self.drop_on == verb:
                return
            if verb == "EHLO":
                reply = self._ehlo_reply(s)
            elif verb == "HELO":
                reply = self.helo
            elif verb == "STARTTLS" and self.tls_context is not None:
                writer.write(_reply(self.starttls) + self.extra_after_starttls)
                await writer.drain()
                if self.starttls.startswith("220"):
                    await writer.start_tls(self.tls_context)
                    s.tls = True
                continue
            elif verb == "MAIL":
                mail, rcpts, ok_rcpts = cmd, [], 0
                reply = self.mail(cmd)
            elif verb == "RCPT":
                addr = cmd[cmd.index("<") + 1 : cmd.index(">")]
                reply = self.rcpt(addr)
                rcpts.append(addr)
                ok_rcpts += reply.startswith("2")
            elif verb == "DATA":
                reply = self.data if ok_rcpts else "554 5.5.1 no valid recipients"
                writer.write(b"".join(held) + _reply(reply))
                held = []
                if reply.startswith("354"):
                    body = await self._read_body(reader)
                    s.messages.append(Received(mail, [r for r in rcpts], body, s.tls))
                    reply = self.eod if ok_rcpts else "554 5.5.1 no valid recipients"
                else:
                    continue
            elif verb == "RSET":
                mail, rcpts, ok_rcpts = "", [], 0
                reply = self.rset
            elif verb == "QUIT":
                writer.write(_reply("221 2.0.0 bye"))
                await writer.drain()
                return
            else:
                reply = "502 5.5.2 command not recognized"
            if self.hold_until_data and verb in ("MAIL", "RCPT"):
                held.append(_reply(reply))
                continue
            writer.write(_reply(reply))
            await writer.drain()
            if reply.startswith("421"):
                return

    @staticmethod
    async def _read_body(reader: asyncio.StreamReader) -> bytes:
        lines = []
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("EOF in DATA")
            if line == b".\r\n":
                return b"".join(lines)
            lines.append(line[1:] if line.startswith(b".") else line)


def self_signed(directory: Path, cn: str = "mx.test") -> tuple[Path, Path]:
    """A self-signed certificate for `cn` (openssl CLI): (certfile, keyfile)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={cn}",
         "-addext", f"subjectAltName=DNS:{cn}"],
        check=True, capture_output=True,
    )
    return cert, key


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx
