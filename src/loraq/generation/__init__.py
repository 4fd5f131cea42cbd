"""Text generation: one decode loop (:mod:`.decode`) and how the next token is picked
(:mod:`.sampling`), shared by the library, ``loraq generate`` and ``loraq serve``.

Imports ``model`` and ``batching``; imported by ``train``, ``serve`` and the CLI.
"""
