"""The annotation loop with labeling servers: push pre-annotations, pull corrections as COCO."""
