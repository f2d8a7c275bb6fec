"""tokenlabel.dataloading (see design.md)."""
