"""Checkpoints: saves that are complete or ignored, exact resume, and the check of a checkpoint's files before
anything unpickles them."""
