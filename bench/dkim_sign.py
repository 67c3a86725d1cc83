"""CPU per DKIM signature: what signing at delivery adds to each attempt.

    .venv/bin/python bench/dkim_sign.py [--messages 300] [--repeat 5] [--write-results]

Signs the same message again and again with ferrymail's ``DkimSigner`` (RSA-2048, Ed25519,
and both at once, as a domain with two keys signs) and, side by side, with a bare
``dkim.sign()`` call of dkimpy for the same key, and reports milliseconds of process CPU per
message (the minimum over the repeats, so other load hardly matters) and their ratio (our
overhead: header selection, From: parsing, the x= tag). For scale, the last column relates
the cost to the outbound benchmark's CPU per delivered message (``## Outbound`` of
RESULTS.md, ferrymail direct: 0.520 ms at 2 KB, 0.857 ms at 100 KB).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dkim as dkimpy
import peers  # bench/ is not a package: found via sys.path

from ferrymail import __version__
from ferrymail.cli.dkim import generate
from ferrymail.config.dkim import Dkim
from ferrymail.dkim import DkimSigner

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
DELIVERY_CPU_MS = {2048: 0.520, 102400: 0.857}  # from "## Outbound", ferrymail direct


def message(size: int) -> bytes:
    head = (b"From: Sender <sender@example.org>\r\nTo: rcpt@example.net\r\n"
            b"Subject: benchmark\r\nDate: Mon, 30 Nov 2026 12:00:00 +0000\r\n"
            b"Message-ID: <bench@example.org>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=us-ascii\r\n\r\n")
    line = b"The quick brown fox jumps over the lazy dog, again and again.  \r\n"
    return head + line * max(1, size // len(line))


def cpu_ms(fn, n: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - t) / n * 1000)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--sizes", default="2048,102400")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for kind in ("rsa", "ed25519"):
            paths[kind] = Path(tmp) / f"{kind}.pem"
            paths[kind].write_bytes(generate(kind, 2048))
        configs = {
            "RSA-2048": Dkim.model_validate({"keys": [
                {"domain": "example.org", "selector": "r", "key": str(paths["rsa"])}]}),
            "Ed25519": Dkim.model_validate({"keys": [
                {"domain": "example.org", "selector": "e", "key": str(paths["ed25519"])}]}),
            "RSA-2048 + Ed25519": Dkim.model_validate({"keys": [
                {"domain": "example.org", "selector": "r", "key": str(paths["rsa"])},
                {"domain": "example.org", "selector": "e", "key": str(paths["ed25519"])}]}),
        }
        rows = []
        for size in sizes:
            msg = message(size)
            for name, cfg in configs.items():
                signer = DkimSigner(cfg)
                assert len(signer.sign(msg)) == len(cfg.keys)
                ours = cpu_ms(lambda s=signer, m=msg: s.sign(m), args.messages, args.repeat)

                def bare(cfg: Dkim = cfg, m: bytes = msg) -> None:
                    for k in cfg.keys:
                        dkimpy.sign(m, k.selector.encode(), k.domain.encode(), k.key.material,
                                    canonicalize=(b"relaxed", b"relaxed"),
                                    signature_algorithm=k.key.algorithm.encode())

                base = cpu_ms(bare, args.messages, args.repeat)
                rows.append((name, size, ours, base))
                print(f"{name:20} {size:>7} B  ours {ours:.3f} ms  dkimpy.sign {base:.3f} ms",
                      file=sys.stderr)
    table = ["| keys | size | ferrymail ms/msg | bare dkimpy.sign ms/msg | ratio ours/bare "
             "| vs delivery CPU/msg |", "|---|---:|---:|---:|---:|---:|"]
    for name, size, ours, base in rows:
        rel = DELIVERY_CPU_MS.get(size)
        table.append(f"| {name} | {size // 1024} KB | {ours:.3f} | {base:.3f} | "
                     f"{ours / base:.2f} | {f'+{ours / rel:.0%}' if rel else '-'} |")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    body = (f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
            f"{os.cpu_count()} CPUs, {platform.platform()}; load average before the run {load}"
            f".\nPython {platform.python_version()}, ferrymail {__version__}, dkimpy "
            f"{importlib.metadata.version('dkimpy')}.\n\nCommand: `.venv/bin/python "
            f"bench/dkim_sign.py --messages {args.messages} --repeat {args.repeat}"
            f"{' --write-results' if args.write_results else ''}`\n\n"
            "Process CPU per signed message (minimum of the repeats), relaxed/relaxed, From/To/"
            "Subject oversigned. \"vs delivery CPU/msg\" divides by ferrymail's CPU per "
            "delivered message in the outbound benchmark: what signing at delivery adds to "
            "each attempt (a retried message pays it again).\n\n" + "\n".join(table) + "\n")
    print(body)
    if args.write_results:
        peers.replace_section(RESULTS, "## DKIM signing", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
