"""The COCO category table used by torchvision's COCO-trained detection models.

torchvision's models predict 91 labels whose index is the original COCO category id: 0 is the
background and the 11 ids that COCO never used are "N/A" placeholders. Writing the table out here
keeps segcli's output independent of a private torchvision attribute that could move.
"""

from __future__ import annotations

COCO_LABELS: list[str] = [
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train",
    "truck", "boat", "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter",
    "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
    "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "N/A",
    "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]  # fmt: skip


def coco_categories() -> list[dict]:
    """The 80 real COCO categories as `{"id": id, "name": name}`, ids 1..90 in order, no N/A."""
    return [
        {"id": i, "name": name}
        for i, name in enumerate(COCO_LABELS)
        if i > 0 and name != "N/A"
    ]


def coco_label_to_category_id() -> list[int]:
    """Model label index -> COCO category id for torchvision's COCO models (the identity; 0 = background)."""
    return list(range(len(COCO_LABELS)))
