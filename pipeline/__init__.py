"""Training side. The top level holds one module per ``cpt`` command (run, train, export, merge, eval, plan, ...)
and the configs they read (config: training, runfile: a whole run); the commands are built from the subpackages:

    losses/      the step's objective: chunked head CE/KL, TM loss (Triton kernel and reference), replay terms
    runtime/     the model, its precision, the DeepSpeed JSON and ZeRO-3 config, torch.distributed in and out
    gere/        the GeRe cache of the base model over the replay shard, and the replay feed
    checkpoint/  complete-or-ignored saves, exact resume, the files' check before unpickling
    evaluation/  held-out perplexity, multiple choice, the report card
    training/    the training loop, its engines, data, lr schedule, penalties, forgetting budget, LoRA, metrics

Each reads the config and those above it only (the TM loss also reads gere's encoding of the states).
"""
