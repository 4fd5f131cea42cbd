"""Serving one base model and many adapters behind an OpenAI-compatible HTTP API.

================  ========================================================================
module            job
================  ========================================================================
loading.py        the base model and tokenizer from an HF folder or a loraq 4-bit checkpoint
registry.py       adapters by name: safe paths under ``--adapter-dir``, LRU of resident ones
adapter_reads.py  adapter folders read off the model lock; parsed copies kept on the host
engine.py         continuous batching on a thread: requests join and leave between steps
metrics.py        counters, gauges and histograms in Prometheus' text format
fields.py         reading request bodies: each bad field a 400 that names it
replies.py        OpenAI response bodies, errors and server-sent event streams
app.py            the FastAPI app: OpenAI routes, adapter routes, auth, errors, health
command.py        ``loraq serve``: arguments, wiring, uvicorn
================  ========================================================================

``fastapi`` and ``uvicorn`` are needed only here (``pip install loraq[serve]``).
"""
