"""tokenlabel.bench (see design.md)."""
