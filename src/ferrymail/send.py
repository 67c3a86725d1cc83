"""One-shot sending without queuing: Halon's ``MIME()->send()`` and ``ferrymail send``.

``send(message, sender, recipients, options)`` connects (directly, or through an HAProxy with
a PROXY header naming the source IP), runs one SMTP transaction and returns the result object
of Halon's ``send()``::

    {"result": {"code": 250, "enhanced": [2, 0, 0], "reason": ["Ok"], "state": "EOD"},
     "connection": {"localip": "…", "remoteip": "…", "remotemx": "", "tls": {"started": False}},
     "duration": 0.02}

or, when no SMTP reply decided it, ``{"error": {"temporary", "message", "type"}, "connection",
"duration"}``. ``enhanced`` is ``[]`` when the server sent no enhanced status code.
Nothing is spooled and nothing is retried: this is a connectivity test and a scripting tool.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferrymail.delivery.connect import ProxyRoute, Source, Timeouts, check_families
from ferrymail.delivery.errors import DeliveryError, SMTPReplyError
from ferrymail.hooks import (
    TLS_MODES,
    ProxyProtocol,
    SourceIP,
    parse_proxyprotocol,
    parse_sourceip,
    parse_try_options,
)
from ferrymail.mime import MIME
from ferrymail.smtp.client import SMTPClient, TLSMode, TransactionResult
from ferrymail.smtp.protocol import Reply, to_crlf, valid_mailbox

__all__ = ["SendOptions", "add_parser", "main_send", "parse_options", "send", "send_async"]

OPTIONS = ("server", "host", "port", "sourceip", "helo", "proxyprotocol", "tls", "timeout")
DEFAULT_TIMEOUT = 30.0

Logger = Callable[[str], None]


def _stderr_logger(prog: str | None = None) -> Logger:
    name = prog or os.path.basename(sys.argv[0] or "") or "ferrymail"

    def log(line: str) -> None:
        print(f"{name}: {line}", file=sys.stderr, flush=True)

    return log


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class SendOptions:
    """Checked ``send()`` options (see ``parse_options``)."""

    server: str | None = None  # IP or host name; None: MX of the first recipient's domain
    port: int = 25
    sourceip: tuple[SourceIP, ...] = ()  # tried in order until one connects; () = OS choice
    helo: str | None = None  # None: socket.getfqdn()
    proxy: ProxyProtocol | None = None
    tls: str = "optional"
    timeout: float = DEFAULT_TIMEOUT


def parse_options(options: Mapping[str, Any] | None) -> SendOptions:
    """Check the options mapping; ValueError names the bad key and what was expected.

    ``server`` (``host`` is accepted as Halon's alias), ``port``, ``sourceip`` (an address
    or a list of addresses / ``{"address", "helo"}``), ``helo``, ``proxyprotocol``
    (``{"server", "port"[, "version"]}``), ``tls`` and ``timeout`` (seconds).
    """
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown send option(s) {', '.join(map(repr, unknown))} "
                         f"(known: {', '.join(OPTIONS)})")
    if "host" in opts:
        if "server" in opts:
            raise ValueError("give either 'server' or its alias 'host', not both")
        opts["server"] = opts.pop("host")
    # The option checks of the hook's try_() are the same: reuse them.
    checked = parse_try_options({k: v for k, v in opts.items()
                                 if k in ("server", "port", "tls", "timeout")})
    sources: tuple[SourceIP, ...] = ()
    if opts.get("sourceip") is not None:
        sources = parse_sourceip(opts["sourceip"], allow_ids=False)
    proxy = None
    if opts.get("proxyprotocol") not in (None, False):
        proxy = parse_proxyprotocol(opts["proxyprotocol"])
        if not sources:
            raise ValueError("proxyprotocol needs a sourceip: the PROXY header tells the proxy "
                             "which source address to send from")
    helo = opts.get("helo")
    if helo is not None and (not isinstance(helo, str) or not helo.strip()
                             or any(c.isspace() for c in helo)):
        raise ValueError(f"helo: expected a host name, got {helo!r}")
    return SendOptions(
        server=checked.server, port=checked.port or 25, sourceip=sources, helo=helo,
        proxy=proxy, tls=checked.tls or "optional",
        timeout=checked.timeout or DEFAULT_TIMEOUT,
    )


def _path(address: str, what: str, *, allow_null: bool) -> str:
    """``"<>"``/``""`` → null path; ``"<a@b>"`` → ``"a@b"``; checked as a mailbox."""
    if not isinstance(address, str):
        raise ValueError(f"{what}: expected an address string, got {address!r}")
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    if text == "":
        if allow_null:
            return ""
        raise ValueError(f"{what}: the null address <> is only allowed as the sender")
    if not valid_mailbox(text):
        raise ValueError(f"{what}: {address!r} is not a valid address")
    return text


def _message_bytes(message: bytes | bytearray | str | MIME) -> bytes:
    if isinstance(message, MIME):
        return message.to_bytes()
    if isinstance(message, str):
        message = message.encode("utf-8")
    if not isinstance(message, (bytes, bytearray)):
        raise ValueError(f"message must be bytes, str or MIME, got {type(message).__name__}")
    data = to_crlf(bytes(message))
    return data if data.endswith(b"\r\n") else data + b"\r\n"


# --------------------------------------------------------------------------- result


def _reply_dict(reply: Reply, state: str) -> dict[str, Any]:
    return {"code": reply.code, "enhanced": list(reply.enhanced or ()),
            "reason": list(reply.lines), "state": state}


@dataclass
class _Attempt:
    localip: str = ""
    remoteip: str = ""
    remotemx: str = ""
    tls_started: bool = False
    tls_protocol: str | None = None
    tls_cipher: str | None = None

    def connection(self) -> dict[str, Any]:
        tls: dict[str, Any] = {"started": self.tls_started}
        if self.tls_started:
            tls.update(protocol=self.tls_protocol, cipher=self.tls_cipher)
        return {"localip": self.localip, "remoteip": self.remoteip, "remotemx": self.remotemx,
                "tls": tls}


# --------------------------------------------------------------------------- sending


async def _destinations(opts: SendOptions, domain: str,
                        families: tuple[str, ...]) -> list[tuple[str, str]]:
    """``[(ip, mx_name)]`` in the order to try; mx_name is "" when ``server`` was given."""
    if opts.server is not None:
        try:
            return [(str(ipaddress.ip_address(opts.server)), "")]
        except ValueError:
            pass
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(opts.server, opts.port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            permanent = e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5))
            raise DeliveryError("dns", f"cannot resolve server {opts.server}: {e.strerror}",
                                temporary=not permanent, dns="nxdomain" if permanent else "other"
                                ) from None
        ips = list(dict.fromkeys(str(i[4][0]) for i in infos))
        return [(ip, "") for ip in ips]
    from ferrymail.delivery.mx import Resolver

    hosts = await Resolver(timeout=min(opts.timeout, 10)).mx(domain, families=families)
    return [(ip, h.name) for h in hosts for ip in h.addresses]


def _family(ip: str) -> str:
    return "ipv6" if ipaddress.ip_address(ip).version == 6 else "ipv4"


async def send_async(message: bytes | str | MIME, sender: str, recipients: Sequence[str] | str,
                     options: Mapping[str, Any] | None = None, *,
                     log: Logger | None = None) -> dict[str, Any]:
    """Send ``message`` now and return Halon's send() result (see the module docstring).

    Raises ValueError for bad arguments (addresses, options); every failure on the way
    (DNS, connect, proxy, TLS, protocol) is reported in the result's ``error``.
    ``log`` gets the ``send: Connecting …`` lines (default: stderr, prefixed with the
    program name).
    """
    started = time.monotonic()
    opts = parse_options(options)
    mail_from = _path(sender, "sender", allow_null=True)
    if isinstance(recipients, str):
        recipients = [recipients]
    rcpts = [_path(r, "recipient", allow_null=False) for r in recipients]
    if not rcpts:
        raise ValueError("at least one recipient is needed")
    data = _message_bytes(message)
    log = log or _stderr_logger()
    attempt = _Attempt()

    def finish(body: dict[str, Any]) -> dict[str, Any]:
        body["connection"] = attempt.connection()
        body["duration"] = round(time.monotonic() - started, 6)
        return body

    families = tuple(dict.fromkeys(_family(s.address) for s in opts.sourceip)) or (
        "ipv4", "ipv6")
    try:
        dests = await _destinations(opts, rcpts[0].rpartition("@")[2], families)
    except DeliveryError as e:
        return finish({"error": e.as_dict()})
    if not dests:
        err = DeliveryError("dns", f"server {opts.server} has no address", temporary=False,
                            dns="nodata")
        return finish({"error": err.as_dict()})

    timeouts = Timeouts(connect=opts.timeout, banner=opts.timeout, command=opts.timeout,
                        data=opts.timeout)
    proxy = (ProxyRoute(opts.proxy.server, opts.proxy.port, opts.proxy.version)
             if opts.proxy else None)
    sources = opts.sourceip or (SourceIP(""),)  # "" = let the OS choose (direct only)
    default_helo = opts.helo
    if default_helo is None and not all(s.helo for s in sources):
        # getfqdn may ask DNS: not on the event loop.
        default_helo = await asyncio.get_running_loop().run_in_executor(None, socket.getfqdn)
    last_error: DeliveryError | None = None
    for dest_ip, mx_name in dests:
        for src in sources:
            helo = src.helo or default_helo or "localhost"
            source = Source(src.address or None, helo, proxy=proxy)
            try:
                check_families(source, dest_ip)
            except DeliveryError as e:
                last_error = last_error or e
                continue
            any_ip = "::" if _family(dest_ip) == "ipv6" else "0.0.0.0"
            via = f" via [{proxy.server}]:{proxy.port}" if proxy else ""
            log(f"send: Connecting from [{src.address or any_ip}] to "
                f"[{dest_ip}]:{opts.port}{via}")
            attempt = _Attempt(localip=src.address, remoteip=dest_ip, remotemx=mx_name)
            try:
                client = await SMTPClient.connect(source, dest_ip, opts.port, mx_host=mx_name,
                                                  tls=TLSMode(opts.tls), timeouts=timeouts)
            except SMTPReplyError as e:
                return finish({"result": _reply_dict(e.reply, e.state)})
            except DeliveryError as e:
                if e.kind in ("network", "proxy", "config"):
                    last_error = e  # could not connect: next source, then next MX
                    continue
                return finish({"error": e.as_dict()})
            attempt.localip = client.local_ip
            attempt.tls_started = client.tls_started
            attempt.tls_protocol, attempt.tls_cipher = client.tls_version, client.tls_cipher
            try:
                result = await client.send(mail_from, rcpts, data)
            except DeliveryError as e:
                return finish({"error": e.as_dict()})
            finally:
                await client.quit()
            return finish(_transaction_body(result))
    assert last_error is not None
    return finish({"error": last_error.as_dict()})


def _transaction_body(result: TransactionResult) -> dict[str, Any]:
    body: dict[str, Any] = {"result": _reply_dict(result.reply, result.state)}
    if result.state == "EOD":
        refused = [r for r in result.recipients if not 200 <= r.reply.code < 300]
        if refused:  # a partial delivery: say who did not get it
            body["rejected"] = [{"recipient": r.address, **_reply_dict(r.reply, "RCPT")}
                                for r in refused]
    return body


def send(message: bytes | str | MIME, sender: str, recipients: Sequence[str] | str,
         options: Mapping[str, Any] | None = None, *, log: Logger | None = None
         ) -> dict[str, Any]:
    """``send_async`` for code without an event loop (runs one on uvloop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("send() was called inside a running event loop: "
                           "await send_async() instead")
    import uvloop

    return uvloop.run(send_async(message, sender, recipients, options, log=log))


def succeeded(result: Mapping[str, Any]) -> bool:
    """True when every recipient was accepted (a 2xx final reply and no ``rejected``)."""
    res = result.get("result")
    return bool(res) and 200 <= res["code"] < 300 and not result.get("rejected")


# --------------------------------------------------------------------------- CLI


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 127.0.0.1:2525 or "
                                         f"[::1]:2525), got {text!r}")
    return host, int(port)


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f'expected "Name: value", got {text!r}')
    return name.strip(), value.strip()


def _sourceip(text: str) -> dict[str, str]:
    address, sep, helo = text.partition("=")
    return {"address": address, "helo": helo} if sep else {"address": address}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``ferrymail send`` on the ``ferrymail`` command's subparsers."""
    p = subparsers.add_parser(
        "send", help="send one message now, without queuing (prints the result as JSON)",
        description="Send one message now, without queuing, directly or through an HAProxy "
        "(PROXY protocol), and print the result like Halon's send(). Exit status: 0 when "
        "every recipient was accepted, 1 on a 4xx/5xx reply or an error, 2 on bad usage.")
    p.add_argument("--from", dest="sender", required=True, metavar="ADDR",
                   help='envelope sender ("<>" for the null sender)')
    p.add_argument("--to", dest="recipients", required=True, action="append", metavar="ADDR",
                   help="recipient (repeatable)")
    p.add_argument("--server", metavar="HOST",
                   help="next hop, IP or host name (default: MX of the first recipient)")
    p.add_argument("--port", type=int, default=25, metavar="N", help="next-hop port (25)")
    p.add_argument("--sourceip", action="append", type=_sourceip, metavar="IP[=HELO]",
                   help="source IP, optionally with its HELO; repeatable: tried in order")
    p.add_argument("--helo", metavar="NAME", help="HELO name (default: this host's FQDN)")
    p.add_argument("--proxy", type=_hostport, metavar="HOST:PORT",
                   help="connect through this HAProxy (bind … accept-proxy)")
    p.add_argument("--proxy-version", type=int, choices=(1, 2), default=1,
                   help="PROXY protocol version (1)")
    p.add_argument("--subject", metavar="TEXT", help="Subject header")
    p.add_argument("--body", metavar="TEXT", help="message text")
    p.add_argument("--file", metavar="FILE",
                   help="a whole RFC 5322 message to send as it is ('-' = stdin)")
    p.add_argument("--header", action="append", type=_header, default=[], metavar='"N: V"',
                   help="extra header (repeatable)")
    p.add_argument("--tls", choices=TLS_MODES, default="optional", help="STARTTLS (optional)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="connect, banner and command timeout (30)")
    p.set_defaults(func=main_send)


def _build_message(args: argparse.Namespace) -> bytes | MIME:
    if args.file is not None:
        if args.subject is not None or args.body is not None or args.header:
            raise ValueError("--file sends a whole message: it cannot be combined with "
                             "--subject, --body or --header")
        if args.file == "-":
            return sys.stdin.buffer.read()
        try:
            return Path(args.file).read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read --file {args.file}: {e.strerror}") from None
    mime = MIME()
    given = {name.lower() for name, _ in args.header}
    if "from" not in given:
        mime.add_header("From", args.sender)
    if "to" not in given:
        mime.add_header("To", ", ".join(args.recipients))
    if args.subject is not None:
        mime.add_header("Subject", args.subject)
    for name, value in args.header:
        mime.add_header(name, value)
    return mime.set_body(args.body if args.body is not None else "")


def main_send(args: argparse.Namespace) -> int:
    """Run ``ferrymail send``: print the JSON result; 0 all accepted, 1 not, 2 bad usage."""
    options: dict[str, Any] = {"port": args.port, "tls": args.tls, "timeout": args.timeout}
    if args.server is not None:
        options["server"] = args.server
    if args.sourceip:
        options["sourceip"] = args.sourceip
    if args.helo is not None:
        options["helo"] = args.helo
    if args.proxy is not None:
        options["proxyprotocol"] = {"server": args.proxy[0], "port": args.proxy[1],
                                    "version": args.proxy_version}
    try:
        message = _build_message(args)
        result = send(message, args.sender, args.recipients, options,
                      log=_stderr_logger("ferrymail"))
    except ValueError as e:
        print(f"ferrymail send: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=4))
    return 0 if succeeded(result) else 1
