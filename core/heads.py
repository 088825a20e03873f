"""A causal LM split into its body and its output head, for the fused distillation loss.

The largest tensors of a distillation step are the two models' logits, [tokens × vocab]. The
trainer runs each model's body only (hidden states) and hands the heads to `fused_amid_loss`,
which applies them chunk by chunk at the response positions. That is exact only when the logits
are nothing but `hidden @ weight.T + bias`: a model that soft-caps or scales its logits, or whose
head is not a plain linear layer, keeps the logits path (`split_head` says why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Config fields of transformers models that change logits after the head's matmul (Gemma 2's
# soft-capping, Cohere's and Granite's scaling).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
_PROBE_TOKENS = 8


@dataclass(frozen=True)
class SplitModel:
    """The model's body (input ids → last hidden states) and its head's parameters, cut to the
    shared vocabulary width."""

    body: nn.Module
    weight: Tensor
    bias: Tensor | None

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden: Tensor = out.last_hidden_state
        return hidden


def split_head(model: PreTrainedModel, width: int) -> SplitModel | str:
    """The model as body and head, or the reason the fused path cannot reproduce its logits."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return f"its output head is a {type(head).__name__}, not a linear layer"
    for name in _LOGIT_TRANSFORMS:
        value = getattr(model.config, name, None)
        if value not in (None, 1, 1.0, False):
            return f"it transforms its logits after the head ({name} = {value})"
    body = model.base_model
    if body is model:
        return "it has no separate body module"
    split = SplitModel(
        body=body,
        weight=head.weight[:width],
        bias=None if head.bias is None else head.bias[:width],
    )
    # A last check on real numbers: any other post-processing of the logits shows up here.
    ids = torch.arange(_PROBE_TOKENS, device=head.weight.device).remainder(width).unsqueeze(0)
    attention = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=attention).logits[..., :width]
            hidden = split.hidden_states(ids, attention)
            got = hidden.to(split.weight.dtype) @ split.weight.T
            if split.bias is not None:
                got = got + split.bias
    finally:
        model.train(was_training)
    tolerance = 1e-4 if expected.dtype == torch.float32 else 2e-2
    if not torch.allclose(got.float(), expected.float(), rtol=tolerance, atol=tolerance):
        return "its logits differ from its last hidden states times its head"
    return split
