//! The bundle's `config.json` / `generation_config.json`, validated once.
