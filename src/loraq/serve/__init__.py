"""Serving one base model and many adapters behind an OpenAI-compatible HTTP API.

==============  ==========================================================================
module          job
==============  ==========================================================================
loading.py      the base model and tokenizer from an HF folder or a loraq 4-bit checkpoint
registry.py     adapters by name: safe paths under ``--adapter-dir``, LRU of resident ones
engine.py       continuous batching on a thread: requests join and leave between steps
metrics.py      counters, gauges and histograms in Prometheus' text format
app.py          the FastAPI app: OpenAI routes, adapter routes, auth, errors, health
command.py      ``loraq serve``: arguments, wiring, uvicorn
==============  ==========================================================================

``fastapi`` and ``uvicorn`` are needed only here (``pip install loraq[serve]``).
"""
