"""The admin API: HTTP/JSON on a Unix socket (server in the daemon, client for the CLI)."""
