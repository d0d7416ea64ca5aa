"""Deployment: the coordinator service and the site agents, over HTTPS.

- ``config``: the federation config file (TOML).
- ``pki``: the federation CA, the coordinator's TLS certificate, site keys, tokens.
- ``auth``: Ed25519 request signatures with replay protection.
- ``wire``: compressed safetensors and JSON bodies, validated before use.
- ``store``: durable state in SQL (SQLite by default) and safetensors files.
- ``transport``: the round engine's Transport, served to sites by long polling.
- ``server``: the HTTP API (FastAPI).
- ``coordinator``: the service that runs setup and rounds, resumable anywhere.
- ``sitedata`` and ``agent``: the site side, outbound requests only.
- ``cli``: ``prifed ca``, ``prifed coordinator`` and ``prifed site``.
"""
