"""Built-in race scenarios for ``kvmcore explore`` (one per seed thread at least)."""
