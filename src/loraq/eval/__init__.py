"""Evaluation the way the field does it: lm-evaluation-harness on any loraq model, perplexity.

=====================  ==================================================================
module                 job
=====================  ==================================================================
``harness``            hands a loraq model (any base, adapters, merges) to lm-eval's own
                       ``HFLM`` and collects one column of scores per model variant
``perplexity``         sliding-window perplexity of a text: token, word and byte perplexity
                       and bits per byte as lm-eval's ``wikitext`` task defines them
``during_training``    ``training.eval_tasks``: lm-eval tasks scored on the model being
                       trained, at each of its evaluations (``loraq train`` imports it)
``offline``            ``--offline``: Hugging Face Hub and datasets offline for the duration
``report``             the table of scores (one column per variant) and the JSON output
``command``            ``loraq eval``'s options and the run of ``--tasks`` / ``--perplexity``
=====================  ==================================================================

lm-eval is an optional extra (``pip install 'loraq[eval]'``); :mod:`harness` imports it only
when a task runs. It loads no model itself (the command line hands it one) and sits a floor
below ``train`` and ``serve``, which may import it (``tests/test_imports.py``).
"""
