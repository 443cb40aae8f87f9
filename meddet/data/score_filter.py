"""Drop detections below a score threshold, for front ends that show every box they receive.

MONAI Label's detection writer keeps only `box` and `label` (the scores are lost), so whatever the bundle's
`postprocessing` returns is drawn in 3D Slicer. Evaluation wants every box down to the inferer's low
`score_thresh` (FROC, mAP); a viewer wants the confident ones. This transform is the viewer's threshold,
applied after the boxes are in world coordinates; at 0.0 it keeps everything.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.transforms import Transform


class SelectDetectionsByScored(Transform):
    """Keep the detections whose score is at least `score_thresh`.

    Args:
        score_thresh: lowest score kept (inclusive); 0.0 keeps all.
        box_key, label_key, score_key: keys of the per-image detections, `box` [N, 6] (any box mode),
            `label` [N], `score` [N]; the same rows are kept in all three.

    Example: `{"box": [3, 6], "label": [3], "label_scores": [0.9, 0.2, 0.6]}` with `score_thresh=0.5`
    -> rows 0 and 2.
    """

    def __init__(self, score_thresh: float = 0.0, box_key: str = "box", label_key: str = "label",
                 score_key: str = "label_scores"):
        self.score_thresh = float(score_thresh)
        self.box_key, self.label_key, self.score_key = box_key, label_key, score_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if self.score_thresh <= 0.0:  # nothing to drop: also serves items that carry boxes only
            return d
        missing = [k for k in (self.box_key, self.label_key, self.score_key) if k not in d]
        if missing:
            raise KeyError(f"SelectDetectionsByScored: the detections lack the key(s) {missing}; got {sorted(map(str, d))}")
        scores = torch.as_tensor(d[self.score_key]).reshape(-1)
        boxes, labels = torch.as_tensor(d[self.box_key]), torch.as_tensor(d[self.label_key]).reshape(-1)
        if not (len(boxes) == len(labels) == len(scores)):
            raise ValueError(
                f"SelectDetectionsByScored: {len(boxes)} boxes, {len(labels)} labels and {len(scores)} scores; "
                "each detection needs one of each"
            )
        keep = scores >= self.score_thresh
        d[self.box_key], d[self.label_key], d[self.score_key] = boxes[keep], labels[keep], scores[keep]
        return d
