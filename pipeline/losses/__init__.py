"""Losses, one file each; a fused kernel lives beside its PyTorch reference."""
