"""The `nfm` command and what every stage shares: configuration, data, the training loop, I/O."""
