"""The lamina-node daemons: a model node and attention nodes serving disaggregated decoding.

``cli`` is the ``lamina-node`` entry point. The model role is ``model_node``
(the scheduler: admission, steps, recovery, status) with ``options``,
``requests`` (request handles and events), ``cluster`` (the attention workers,
their losses and replacements) and ``step`` (micro-batches and the pipelined
step); ``http_api`` is its front door and ``metrics`` its Prometheus text.
The attention role is ``attention_node`` (sessions of several model nodes)
with ``kv_shares`` (admission between them); ``membership`` is the run-time
join and leave of workers. ``protocol`` is what the two say to
each other, ``demo`` runs a cluster on loopback (``make demo``). The model
math both roles run is in ``lamina_comm.model``.
"""
