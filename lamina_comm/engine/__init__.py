"""The embeddable engine API: what a serving engine calls to put lamina-comm between its tiers.

- ``rendezvous`` / ``RendezvousServer``: a world of model ranks and attention
  ranks that find each other from one address and a shared secret.
- ``RemoteAttention`` (model tier): per layer and micro-batch, ``send`` q/k/v
  to every attention rank's head share (``SendHandle`` says when the sources
  may be reused), ``recv_into`` the outputs gathered into the caller's tensor.
- ``AttentionService`` (attention tier): ``recv`` a layer's q/k/v for this
  rank's heads as tensors over slot memory, answer with the output written in
  the reply slot.
- ``AttentionShape``: the heads, the largest micro-batch, the depth.
- ``lamina_comm.engine.ops`` (imported on its own): ``torch.library`` custom
  ops over ``RemoteAttention`` that ``torch.compile`` traces through.
- ``lamina_comm.engine.afd.LaminaAFDConnector``: vLLM's attention-FFN
  disaggregation connector contract over the same channels.

docs/engine.md has a two-process example and the contract.
"""
from .remote import LayerBuffers, RankReply, RemoteAttention, SendHandle
from .rendezvous import RendezvousError, RendezvousServer, RendezvousTimeout, World, rendezvous
from .service import AttentionService, LayerRequest
from .shape import AttentionShape
from .wire import AttentionRankError

__all__ = [
    "AttentionRankError",
    "AttentionService",
    "AttentionShape",
    "LayerBuffers",
    "LayerRequest",
    "RankReply",
    "RemoteAttention",
    "RendezvousError",
    "RendezvousServer",
    "RendezvousTimeout",
    "SendHandle",
    "World",
    "rendezvous",
]
