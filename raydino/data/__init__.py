"""Data: image sources and multi-crop augmentation."""
