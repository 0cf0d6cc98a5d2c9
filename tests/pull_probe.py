"""Run under the deepspeed launcher by test_train_units: does an L2-SP pull reach the next forward?

A tiny Llama under ZeRO-3 (norm weights persistent: below stage3_param_persistence_threshold), one
optimizer step, then a pull strong enough to put every weight back on its anchor (lr·λ = 1). The
next forward must then see the anchors, persistent parameters included; prints one JSON line.
"""

from __future__ import annotations

import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from pipeline.runtime.distributed import finish, init_distributed
from pipeline.runtime.model import ModelSource, load_causal_lm
from pipeline.training.penalty import AnchorPull

TINY = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def main() -> None:
    init_distributed()
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100},
        "zero_allow_untested_optimizer": True,
    }
    model = load_causal_lm(ModelSource(config=TINY, seed=0))
    anchors = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=config,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
    )
    params = [p for _, p in engine.module.named_parameters()]
    pull = AnchorPull(params, weight=1.0)
    ids = torch.arange(2, 18).unsqueeze(0)
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()  # every weight moves; persistent ones are gathered again at the end of the step
    pull.apply(lr=1.0)  # factor 1: every local partition back on its anchor
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            for pname, p in module.named_parameters(recurse=False):
                seen[f"{name}.{pname}" if name else pname] = p.detach().clone()

        return hook

    for name, module in engine.module.named_modules():
        module.register_forward_hook(record(name))
    with torch.no_grad():
        engine(input_ids=ids)
    off = {n: float((seen[n].float() - anchors[n].float()).abs().max()) for n in seen if n in anchors}
    persistent = sorted(n for n, p in engine.module.named_parameters() if getattr(p, "ds_persist", False))
    if dist.get_rank() == 0:
        print(json.dumps({"max_off_anchor": off, "persistent": persistent}))
    finish()


if __name__ == "__main__":
    sys.exit(main())
