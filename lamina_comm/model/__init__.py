"""Model math of a Llama-family decoder split into the two Lamina tiers.

``config`` holds the architecture (``LlamaConfig``, HF ``config.json``),
``weights`` the weights and safetensors checkpoints, ``layers`` RMSNorm and
the rotary embedding, ``model_tier`` the weight-carrying model tier
(embedding, projections, FFN, logits), ``kvcache`` the weight-free attention
tier (paged KV cache and attention over a head-wise share of the KV heads),
``sampling`` token selection.  ``reference.MonolithicModel`` runs both tiers
in one process and is the numerical reference for the disaggregated runtime
in ``lamina_comm.node``.
"""

from lamina_comm.model.config import LlamaConfig
from lamina_comm.model.kvcache import (
    HeadRange,
    KVCacheFull,
    PagedKVCache,
    RequestId,
    slice_heads,
    split_kv_heads,
)
from lamina_comm.model.layers import apply_rotary, rms_norm, rope_inv_freq
from lamina_comm.model.model_tier import AttendFn, BatchEntry, HeadOutputs, ModelTier, StepInputs
from lamina_comm.model.reference import MonolithicModel
from lamina_comm.model.sampling import (SamplingError, SamplingParams, make_generator, sample, sample_each,
                                        token_logprobs)
from lamina_comm.model.weights import CheckpointError, LayerWeights, LlamaWeights, expected_tensor_shapes

__all__ = [
    "AttendFn",
    "BatchEntry",
    "CheckpointError",
    "HeadOutputs",
    "HeadRange",
    "KVCacheFull",
    "LayerWeights",
    "LlamaConfig",
    "LlamaWeights",
    "ModelTier",
    "MonolithicModel",
    "PagedKVCache",
    "RequestId",
    "SamplingError",
    "SamplingParams",
    "StepInputs",
    "apply_rotary",
    "expected_tensor_shapes",
    "make_generator",
    "rms_norm",
    "rope_inv_freq",
    "sample",
    "sample_each",
    "slice_heads",
    "split_kv_heads",
    "token_logprobs",
]
