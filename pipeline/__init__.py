"""Training side: GeRe replay (cache + TM loss); training loop, eval and export to follow."""
