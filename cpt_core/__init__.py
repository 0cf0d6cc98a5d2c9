"""Infrastructure both sides share: the error hierarchy, typed configs, atomic writes, progress and logging."""
