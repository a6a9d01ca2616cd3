"""The model adapter: every reach into the target model's modules.

The drafter runs the target's own decoder layers, embedding, final norm and LM
head. Where those live and how they are called depends on the architecture;
``ModelAdapter`` holds that knowledge for the families vLLM implements as
``model.embed_tokens -> model.layers[i](positions, hidden, residual) ->
model.norm(hidden, residual) -> compute_logits`` (Llama, Qwen2). A model of
another architecture is refused at engine start (``check_architecture``).
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedModel

# Architectures (config.json "architectures") the adapter is written and tested for.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


def check_architecture(hf_config) -> None:
    """Refuse, at engine start, a model the adapter does not know."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise UnsupportedModel(
            f"adadecode supports the architectures {list(SUPPORTED_ARCHITECTURES)}; "
            f"the model's config.json names {archs or 'none'}")


class ModelAdapter:
    """The target model's parts, as the drafter and the deferred forward use them."""

    def __init__(self, model):
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "norm"):
            raise UnsupportedModel(
                f"AdaDecode supports decoder-only models with model.layers and model.norm "
                f"({', '.join(SUPPORTED_ARCHITECTURES)}); got {type(model).__name__}")
        self.model = model
        self._inner = inner
        self.layers = inner.layers
        self.hidden_size: int = model.config.hidden_size
        self.dtype = next(model.parameters()).dtype

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        inner = self._inner
        if hasattr(inner, "embed_input_ids"):
            return inner.embed_input_ids(token_ids)
        return inner.embed_tokens(token_ids)

    def final_norm(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        norm = self._inner.norm
        if residual is None:
            return norm(hidden)
        return norm(hidden, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)

    def lm_head_rows(self, token_ids: torch.Tensor):
        """(rows of the LM head weight for ``token_ids``, logit scale), or None
        where those rows are not the whole story: a vocabulary split across
        tensor-parallel ranks, soft-capped logits, or an LM head without a
        plain weight."""
        from vllm.distributed import get_tp_group

        head = getattr(self.model, "lm_head", None)
        proc = getattr(self.model, "logits_processor", None)
        weight = getattr(head, "weight", None)
        if (get_tp_group().world_size != 1 or weight is None or proc is None
                or getattr(proc, "soft_cap", None)):
            return None
        if int(token_ids.max()) >= weight.shape[0]:
            return None
        return weight[token_ids].clone(), float(getattr(proc, "scale", 1.0))


def cpu_linear(weight: torch.Tensor):
    """``x -> x @ weight.T`` through vLLM's own CPU GEMM for a fixed weight
    (oneDNN with the weight prepacked, as vLLM's linear layers run on CPU)."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(weight.detach().contiguous(), requires_grad=False)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    return lambda x: layer.cpu_linear(x, layer.weight, None)
