"""The fine-tuning methods, in one registry: what each adds to the model, what of it trains and is
saved, and the file its trained weights go to. Training and `checkpoint.load_finetuned` both read it."""

from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Union

from lit_llama.adapter import AdapterConfig, inject_adapter, is_adapter_name
from lit_llama.errors import BadValue
from lit_llama.lora import LoRAConfig, inject_lora, is_lora_name
from lit_llama.model import LLaMA
from lit_llama.vocab import attach_token_rows

Method = Literal["lora", "adapter", "full"]
MethodConfig = Union[LoRAConfig, AdapterConfig, None]


@dataclass(frozen=True)
class FineTuneMethod:
    """One method. `config` None: every weight trains, and the out dir is a plain checkpoint dir."""

    name: str
    config: Optional[type] = None  # its settings (LoRAConfig, AdapterConfig), saved under its name
    inject: Optional[Callable[[LLaMA, Any], None]] = None  # adds its parameters to the model
    trains: Optional[Callable[[str], bool]] = None  # the parameter names that train and are saved
    weights_file: Optional[str] = None  # where its trained weights go in the out dir

    @property
    def whole(self) -> bool:
        """Every weight trains: the out dir holds a whole checkpoint."""
        return self.config is None


METHODS = {
    "lora": FineTuneMethod("lora", LoRAConfig, inject_lora, is_lora_name, "lit_model_lora.pth"),
    "adapter": FineTuneMethod("adapter", AdapterConfig, inject_adapter, is_adapter_name, "lit_model_adapter.pth"),
    "full": FineTuneMethod("full"),
}


def method_of(name: str) -> FineTuneMethod:
    if name not in METHODS:
        raise BadValue(f"unknown fine-tuning method {name!r}: one of {', '.join(METHODS)}")
    return METHODS[name]


def prepare_model(model: LLaMA, method: Method, method_config: MethodConfig, special_ids: list[int]) -> None:
    """Set `model` up for `method` and mark what trains. The special tokens' rows become parameters of
    their own (`model.token_rows`), to learn at their own rate. LoRA and adapter freeze the base and
    train their own parameters and those rows; full trains everything."""
    attach_token_rows(model, special_ids)
    spec = method_of(method)
    if spec.whole:  # the rows in wte and lm_head that token_rows stands for get no gradient
        return
    spec.inject(model, method_config)
    for name, param in model.named_parameters():
        param.requires_grad = spec.trains(name)
