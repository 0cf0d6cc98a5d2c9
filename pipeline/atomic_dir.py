"""Directories that appear complete or not at all (written under a temporary name, then renamed)."""
from data_prep.atomic import atomic_path as atomic_dir  # one implementation for both halves of the project

__all__ = ["atomic_dir"]
