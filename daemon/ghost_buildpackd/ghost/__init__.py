"""What faces Ghost 19.08: its documents and config.yml as the daemon reads them, and its side of the handshakes.

- `documents.py`: jobs and apps as validated records, and the rules Ghost uses (`parse_job`, `parse_app`,
  `containers_off`); `fields.py` reads one field (`BadDocument`), `scripts.py` Ghost's module scripts;
- `config_yml.py`: Ghost's own config.yml, the settings it shares with the daemon;
- `client.py`: Ghost's side of the deploy and build handshakes (`run_buildpack`, `run_buildimage`);
- `commands.py`: the `buildpack` and `buildimage` commands Ghost's worker runs.

The change to Ghost itself is the repository's ghost/ghost-19.08.patch, which calls those commands.
Nothing is imported here, so that each module brings in only what it needs.
"""
