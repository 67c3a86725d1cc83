"""The proxy tier's configuration (HAProxy, keepalived) generated from ferrymail's config."""
