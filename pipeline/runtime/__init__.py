"""The model and the processes around it, shared by training, the GeRe cache, eval and export: loading the model,
its precision, the DeepSpeed JSON and the ZeRO-3 config filled from it, torch.distributed in and out, host memory."""
