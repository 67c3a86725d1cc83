"""Node.js peers for tests: mailauth (an independent DKIM verifier) and nodemailer (a client).

``node_packages()`` installs the pinned packages once into a cache folder under the temp
directory (npm's ordinary client and registry) and returns it; a test that cannot have them
(no node/npm, no registry) skips, saying why.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

PACKAGES = {"mailauth": "4.13.3", "nodemailer": "10.6.1"}

_MAILAUTH_VERIFY = r"""
import { dkimVerify } from 'mailauth/lib/dkim/verify.js';
import fs from 'fs';
const records = JSON.parse(fs.readFileSync(process.argv[3]));
const resolver = async (name, type) => {
  if (type === 'TXT' && records[name]) return [[records[name]]];
  const e = new Error('no such record: ' + name); e.code = 'ENOTFOUND'; throw e;
};
const r = await dkimVerify(fs.readFileSync(process.argv[2]), { resolver });
console.log(JSON.stringify(r.results.map(x => ({
  result: x.status.result, domain: x.signingDomain, selector: x.selector, algo: x.algo,
  comment: x.status.comment || '' }))));
"""


def node_packages() -> Path:
    """The folder whose node_modules holds PACKAGES; pytest.skip if it cannot be made."""
    folder, why = node_packages_or_reason()
    if folder is None:
        pytest.skip(why)
    return folder


_failed: list[str] = []  # why the install failed in this test run: not tried again


def node_packages_or_reason() -> tuple[Path | None, str]:
    """(folder, "") once PACKAGES are installed, else (None, why not)."""
    if _failed:
        return None, _failed[0]
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        return None, "node/npm not installed"
    tag = "-".join(f"{k}{v}" for k, v in sorted(PACKAGES.items()))
    folder = Path(tempfile.gettempdir()) / f"ferrymail-node-{tag}"
    stamp = folder / ".installed"
    if stamp.exists():
        return folder, ""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:  # other test runs on the machine may install too
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists():
            return folder, ""
        got, why = _install(folder, npm, stamp)
    if got is None:
        _failed.append(why)
    return got, why


def _install(folder: Path, npm: str, stamp: Path) -> tuple[Path | None, str]:
    (folder / "package.json").write_text(json.dumps(
        {"name": "ferrymail-test-peers", "private": True, "type": "module",
         "dependencies": PACKAGES}))
    try:
        proc = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--silent"],
                              cwd=folder, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return None, "npm install of mailauth/nodemailer took over 180 s"
    if proc.returncode != 0:
        return None, f"npm install of mailauth/nodemailer failed: {proc.stderr[-500:]}"
    stamp.touch()
    return folder, ""


def mailauth_verify(message: bytes, records: dict[str, str]) -> list[dict[str, str]] | None:
    """mailauth's DKIM verdicts for ``message`` (``records``: TXT name -> value); None when
    mailauth cannot be had (``test_mailauth_available`` then skips, saying why)."""
    folder, _ = node_packages_or_reason()
    if folder is None:
        return None
    script = folder / "verify.mjs"
    if not script.exists():
        script.write_text(_MAILAUTH_VERIFY)
    with tempfile.TemporaryDirectory() as tmp:
        msg, recs = Path(tmp) / "message.eml", Path(tmp) / "records.json"
        msg.write_bytes(message)
        recs.write_text(json.dumps({k.rstrip("."): v for k, v in records.items()}))
        proc = subprocess.run(["node", str(script), str(msg), str(recs)], cwd=folder,
                              capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, NODE_NO_WARNINGS="1"))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]
