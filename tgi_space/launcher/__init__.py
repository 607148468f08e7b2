"""Shims installed ahead of TGI's own binaries: the launcher flag `--speculate-mode` and the shard dispatch."""
