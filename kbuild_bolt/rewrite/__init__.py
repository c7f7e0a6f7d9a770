"""The rewrite engine: a list of passes over one rewrite context."""
