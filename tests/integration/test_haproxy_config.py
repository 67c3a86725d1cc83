"""The seed's outbound `listen` section as ferrymail writes it: HAProxy 2.6 accepts it."""

from __future__ import annotations

import subprocess

from ferrymail.proxytier.haproxy import outbound_listen
from tests.realpeers import require


def test_outbound_listen_is_the_seed_section_and_haproxy_accepts_it(tmp_path):
    text = outbound_listen("::1", 2525, allowed="192.168.0.0/16")
    assert "bind [::1]:2525 accept-proxy" in text
    assert "acl is_local src 192.168.0.0/16" in text
    assert "server v4 0.0.0.0 source 0.0.0.0 usesrc clientip" in text
    assert "server v6 ::: source ::: usesrc clientip" in text
    cfg = tmp_path / "h.cfg"
    cfg.write_text("defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 1s\n"
                   "    timeout server 1s\n" + text)
    check = subprocess.run([require("haproxy"), "-c", "-f", str(cfg)], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
