"""tokenlabel.kernels (see design.md)."""
