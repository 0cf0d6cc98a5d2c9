"""What the training loop is built from: the loop itself, the engines, the data feed, the lr schedule, the
anti-forgetting levers beside the loss (penalties, the forgetting budget, LoRA adapters) and the metrics it logs."""
