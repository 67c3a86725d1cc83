#!/usr/bin/env python3
"""The seed's hsh test script in Python: build a message with MIME() and send it through the
proxy without queuing, then pretty-print the result.

    python examples/send_hello.py --server 172.253.122.26 --sourceip 45.33.68.55 \\
        --proxy 192.168.1.2 --proxy-port 2525 --to someone@gmail.com

The HSL original (from the seed)::

    $mail = MIME()
        ->addHeader("Subject", "Hello")
        ->setBody("Hello World")
        ->addHeader("From", "<>")
        ->addHeader("Message-ID", "<" . uuid() . "@example.com>");
    $test = $mail->send("<>", ["someone@gmail.com"], [
        "server" => "172.253.122.26", "port" => 25, "sourceip" => "45.33.68.55",
        "proxyprotocol" => ["server" => "192.168.1.2", "port" => 2525]]);
    echo json_encode($test, ["pretty_print" => true]);
"""

import argparse
import json
from uuid import uuid4

from ferrymail import MIME

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--server", required=True, help="destination mailbox host (an MX)")
parser.add_argument("--port", type=int, default=25, help="destination port")
parser.add_argument("--sourceip", required=True, help="source IP for the outbound connection")
parser.add_argument("--proxy", required=True, help="the HAProxy to route through")
parser.add_argument("--proxy-port", type=int, default=2525)
parser.add_argument("--from", dest="sender", default="<>")
parser.add_argument("--to", required=True)
args = parser.parse_args()

mail = (
    MIME()
    .add_header("Subject", "Hello")
    .set_body("Hello World")
    .add_header("From", "<>")
    .add_header("Message-ID", f"<{uuid4()}@example.com>")
)
test = mail.send(
    args.sender,
    [args.to],
    {
        "server": args.server,  # destination mailbox host
        "port": args.port,  # destination port
        "sourceip": args.sourceip,  # source IP for the outbound connection
        "proxyprotocol": {"server": args.proxy, "port": args.proxy_port},  # route via proxy
    },
)
print(json.dumps(test, indent=4))
