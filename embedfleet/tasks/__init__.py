"""Pure per-partition functions: no cluster, no config, only their arguments."""
