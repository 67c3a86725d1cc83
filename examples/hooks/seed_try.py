"""The seed's pre-delivery script, in Python: send every message through the proxy at
192.168.1.2:2525 from one of three source IPs, each with its own HELO.

HSL original::

    Try([
    "proxyprotocol" => ["server" => "192.168.1.2", "port" => 2525],
    "sourceip" => [
    ["address" => "1.2.3.4", "helo" => "smtp4.example.com"],
    ["address" => "1.2.3.5", "helo" => "smtp5.example.com"],
    ["address" => "1.2.3.6", "helo" => "smtp6.example.com"],
    ]]);

In a running file in ``examples/`` (a relative hook path is resolved against the folder of
the running file; ``ferrymail config check`` loads the hook the same way)::

    scripting:
      hooks:
        predelivery: hooks/seed_try.py
"""


def predelivery(ctx, action):
    action.try_(
        proxyprotocol={"server": "192.168.1.2", "port": 2525},
        sourceip=[
            {"address": "1.2.3.4", "helo": "smtp4.example.com"},
            {"address": "1.2.3.5", "helo": "smtp5.example.com"},
            {"address": "1.2.3.6", "helo": "smtp6.example.com"},
        ],
    )
