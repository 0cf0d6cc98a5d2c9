"""GeRe (arXiv 2508.04676): hold final-layer activations on a fixed replay set with the TM loss."""
