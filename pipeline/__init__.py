"""Training side: config, the training loop under DeepSpeed ZeRO-3, GeRe replay, checkpoints, eval and export."""
