"""Operations: the `sharp` CLI (up, demo, admin, jobs), the HTTP client, the embedded stack and
the commands that launch the API and workers. The top layer: it may import everything below."""
