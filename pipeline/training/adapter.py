"""Low-rank adapters (PEFT's LoRA) trained on a frozen base, built into the model in place.

PEFT's ``inject_adapter_in_model`` swaps the targeted linear layers for LoRA
layers and freezes everything else; the model keeps its class, so the rest of
the pipeline (hidden-state losses, isolation probe, exports) sees the same
module tree with ``base_layer``/``lora_A``/``lora_B`` children. The base with
its adapters switched off is the base model, so it serves as the teacher of KD
and replay KL (:class:`AdapterFreeTeacher`) without a second copy of the
weights. Checkpoints hold the trainable tensors only (DeepSpeed's
``exclude_frozen_parameters``): the frozen weights are the base's files.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from cpt_core.errors import ConfigError

from ..config import AdapterConfig

ADAPTER_NAME = "default"  # PEFT's name for a model's only adapter


def uses_adapter(adapter: AdapterConfig | dict[str, Any] | None) -> bool:
    """Whether a run trains adapters (its config section, or that section as a checkpoint's dict holds it; a
    checkpoint older than adapters has none)."""
    if adapter is None:
        return False
    kind = adapter["kind"] if isinstance(adapter, dict) else adapter.kind
    return kind != "none"


def lora_config(adapter: AdapterConfig | dict[str, Any]) -> LoraConfig:
    """PEFT's config for the run's adapter section (a dataclass, or its dict from a checkpoint)."""
    a = adapter if isinstance(adapter, dict) else vars(adapter)
    return LoraConfig(
        r=a["r"],
        lora_alpha=a["alpha"],
        lora_dropout=a["dropout"],
        target_modules=list(a["target_modules"]) or "all-linear",
        modules_to_save=list(a["modules_to_save"]) or None,
        bias="none",
    )


def add_adapters(model: nn.Module, adapter: AdapterConfig, seed: int) -> int:
    """Inject LoRA into ``model`` in place and freeze the rest; returns the number of trainable parameters.

    Every rank draws the same initial ``lora_A`` from ``seed`` (``lora_B`` starts at 0, so the adapted model
    starts as the base); under ZeRO-3 the new layers are plain tensors until ``deepspeed.initialize`` partitions
    them. The output head and the input embeddings cannot be trained in full beside adapters: the chunked head loss
    and tied embeddings read them as one weight.
    """
    torch.manual_seed(seed)
    try:
        inject_adapter_in_model(lora_config(adapter), model, adapter_name=ADAPTER_NAME)
    except ValueError as e:  # PEFT: a target module name that matches nothing
        raise ConfigError(f"adapter.target_modules {list(adapter.target_modules)}: {e}") from None
    ends = {"output head": model.get_output_embeddings(), "input embeddings": model.get_input_embeddings()}
    for name, module in ends.items():
        if isinstance(module, ModulesToSaveWrapper):
            raise ConfigError(
                f"adapter.modules_to_save {list(adapter.modules_to_save)} names the {name}: train the model in "
                "full (adapter.kind: none) to change it"
            )
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The layers PEFT injected (``B A`` beside a frozen weight), without modules_to_save's trained copies."""
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def adapter_layers(model: nn.Module) -> list[nn.Module]:
    """The modules that switch between the adapted and the base computation."""
    return [m for m in model.modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """``model`` computes as its base inside the block (in eval mode: no dropout), and as before after it."""
    layers, training = adapter_layers(model), model.training
    for layer in layers:
        layer.enable_adapters(False)
    model.eval()
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        model.train(training)


class AdapterFreeTeacher:
    """The trained engine with its adapters off: the frozen base as a teacher, called like an engine.

    Under ZeRO-3 its forward gathers the same base partitions as the student's forward (the LoRA children are
    skipped, not gathered), so it costs one more forward of the base, like a separate teacher engine, without
    the teacher's own copy of the weights.
    """

    def __init__(self, engine: Any) -> None:
        self.engine, self.module = engine, engine.module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), adapters_disabled(self.module):
            return self.engine(*args, **kwargs)
