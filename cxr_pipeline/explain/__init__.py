"""Heatmaps of where the classifier looks: Grad-CAM (fast default) or occlusion (the paper's).

``gradcam`` and ``occlusion`` compute a map over the model input; ``heatmap`` chooses the
method and maps it back onto the radiograph. May import the shared top-level modules,
``dicom`` and ``model``.
"""
