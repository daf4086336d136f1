"""Validation during training: predict the validation images, score them with `segcli eval`'s
COCO evaluation (pycocotools' numbers), on the images the validation file could actually use."""

from __future__ import annotations

import copy

import torch

from segcli.data.coco import CocoDataset, load_json
from segcli.data.images import read_image
from segcli.evaluate.ground_truth import ground_truth_from_dataset
from segcli.evaluate.inputs import pycocotools_output
from segcli.evaluate.run import evaluate_coco
from segcli.model.maskrcnn import MaskRCNN


class Validator:
    def __init__(self, dataset: CocoDataset) -> None:
        self.dataset = dataset
        data = load_json(dataset.source)
        usable = {record.image_id for record in dataset.images}
        # Images the loader skipped (missing files...) would count as misses: score only the rest.
        subset = {
            "images": [i for i in data["images"] if isinstance(i, dict) and i.get("id") in usable],
            "annotations": [a for a in data.get("annotations") or [] if isinstance(a, dict) and a.get("image_id") in usable],
            "categories": copy.deepcopy(data["categories"]),
        }
        with pycocotools_output(quiet=True):
            self.ground_truth = ground_truth_from_dataset(subset, str(dataset.source)).coco

    def predict(self, model: MaskRCNN, device: torch.device, label_to_category_id: list[int]) -> list[dict]:
        """COCO results for every validation image (the model's own thresholds: 0.05, 100 per image)."""
        results = []
        for record in self.dataset.images:
            image = read_image(record.path)
            detections = model(torch.from_numpy(image)[None].to(device), [image.shape[:2]])
            boxes = detections.boxes.cpu().numpy()
            scores = detections.scores.cpu().numpy()
            labels = detections.labels.cpu().numpy()
            for box, score, label, rle in zip(boxes, scores, labels, detections.mask_rles(0)):
                x0, y0, x1, y1 = (float(v) for v in box)
                results.append({"image_id": record.image_id, "category_id": int(label_to_category_id[label]),
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score), "segmentation": rle})
        return results

    def evaluate(self, model: MaskRCNN, device: torch.device, label_to_category_id: list[int]) -> dict[str, float]:
        """{"segm_AP": ..., "segm_AP50": ..., "bbox_AP": ..., ...}; AP is -1 when nothing can be scored."""
        results = self.predict(model, device, label_to_category_id)
        if not results:
            return {"segm_AP": 0.0, "bbox_AP": 0.0, "detections": 0}
        report = evaluate_coco(self.ground_truth, results, ("segm", "bbox"), quiet=True)
        scores = {f"{kind}_{name}": round(report[kind][name], 5) for kind in ("segm", "bbox") for name in ("AP", "AP50", "AP75")}
        scores["detections"] = len(results)
        return scores
