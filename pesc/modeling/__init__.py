"""The model code every method shares, shipped in every checkpoint beside the method's own
configuration_<name>.py / modeling_<name>.py (which live in pesc/methods/<name>/). Torch and transformers only.

Loading a checkpoint of any method through the Auto* factories without remote code:
`pesc.methods.register_auto_classes()` (pesc's commands call it).
"""
