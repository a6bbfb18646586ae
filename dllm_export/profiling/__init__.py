"""Profiling: the roofline (roofline.py) and model sizes (model_shape.py); measurement runs
and reports build on them."""
