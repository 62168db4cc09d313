"""The shipped check policies (TOML); default.toml is what `dsbench check` uses without --policy."""
