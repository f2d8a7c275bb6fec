"""tokenlabel.models (see design.md)."""
