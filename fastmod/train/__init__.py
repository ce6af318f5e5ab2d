"""Training and evaluation: ``python -m fastmod.train`` and ``python -m fastmod.evaluate``.

Modules: ``cli`` (arguments, config resolution), ``config`` (layered YAML
config), ``registry`` (model names -> builders, optimiser schemes, defaults),
``optim`` (optimiser schemes), ``inputs`` (datasets from the config), ``loop``
(the Trainer), ``checkpoint``, ``distributed`` (torchrun/DDP), ``metrics``
(per-type accuracy, JSONL/TensorBoard log), ``plots``.  Kept import-light:
importing ``fastmod.train`` loads none of them.
"""
