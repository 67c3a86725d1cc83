#!/usr/bin/env bash
# Installs the Debian packages the tests use as real peers: HAProxy, swaks,
# Postfix (smtp-sink, smtp-source, smtpd), Redis, keepalived, tmux (ferrymail top) and openssl. No-op when all are present.
set -euo pipefail
need=()
command -v haproxy >/dev/null || need+=(haproxy)
command -v swaks >/dev/null || need+=(swaks)
command -v redis-server >/dev/null || need+=(redis-server)
command -v keepalived >/dev/null || [ -x /usr/sbin/keepalived ] || need+=(keepalived)
command -v tmux >/dev/null || need+=(tmux)
command -v openssl >/dev/null || need+=(openssl)
{ command -v smtp-sink >/dev/null || [ -x /usr/sbin/smtp-sink ]; } || need+=(postfix)
[ ${#need[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
