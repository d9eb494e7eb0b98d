"""Model math for the two Lamina tiers.

``model`` holds the weight-carrying model tier (embedding, projections, FFN,
logits), ``kvcache`` the weight-free attention tier (paged KV cache and
attention over a head-wise share of the KV heads), ``sampling`` token
selection.  ``model.MonolithicModel`` runs both in one process and is the
numerical reference for the disaggregated runtime.
"""
