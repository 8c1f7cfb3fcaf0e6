"""The classifier: architectures, model card, preprocessing, augmentation and inference.

``architectures`` builds the paper's four torchvision networks and the default
EfficientNet-Lite0 (``efficientnet_lite``) and loads checkpoints; ``card`` is the model card
they carry; ``steps`` holds the preprocessing steps both chains share, ``preprocess`` the
deterministic chain (torch only, so inference never imports MONAI) and ``augment`` training's
random chain (MONAI); ``inference`` runs a checkpoint. ``packaged/`` holds the default model.
May import the shared top-level modules and ``dicom``; nothing of ``service`` or ``batch``.
"""
