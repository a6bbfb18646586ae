"""Serving: an OpenAI-compatible HTTP server (``app.py``) over the runtime's ``Generator``,
batching requests that share sampler settings (``scheduler.py``), and a Triton Inference
Server model repository (``triton.py``). Needs the ``serve`` extra (FastAPI, uvicorn)."""
