"""Deployment of a disaggregated cluster on Ray (``lamina-ray``; the ``ray`` extra).

``config`` (the deployment file) imports without Ray; ``ray_cluster`` (bring
up, status, take down) and ``supervisor`` (the detached actor that owns and
heals the deployment) need it.
"""
