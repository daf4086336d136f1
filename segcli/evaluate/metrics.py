"""The names of what COCO evaluation measures, shared by the evaluator and its tables."""

IOU_TYPES = ("segm", "bbox")
# The names of COCOeval.stats, in its order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
