"""The ground floor: facts and rules every other package shares, with no loraq imports below.

=====================  ==========================================================================
module                 holds
=====================  ==========================================================================
:mod:`.errors`         which exceptions are the user's, and the one line the CLI prints for each
:mod:`.dtypes`         float dtype names in files and configs, and back
:mod:`.precision`      what ``compute_dtype: auto`` means on this hardware; autocast helpers
:mod:`.switches`       on / off / auto environment variables, spelled one way
:mod:`.naming`         how adapter tensors are named in memory and on disk
:mod:`.patterns`       module-name regexes that match in bounded time
:mod:`.probes`         facts about this process: peak memory, usable CPUs, thread counts
=====================  ==========================================================================

Every package may import ``core``; ``core`` imports nothing else of loraq.
"""
