"""Python's cyclic garbage collector and the live hop (imports nothing heavy).

Importing torch, numpy, websockets and the model leaves about 280 000 objects the collector tracks. A
full (generation 2) collection walks all of them: about 160 ms on this 2-core machine, and one came
every few seconds in an engine of 256 streams, inside a hop, which then took 366 ms for 190 usually:
over the 320 ms a hop may take. Those objects live as long as the process, so after start-up they are
moved out of the collector's sight (``gc.freeze``, Python's documented way for such objects); a full
collection then walks only what came after (a few thousand objects, about 20 per stream). Objects
frozen are still freed by reference counting; only reference cycles among them would wait for
``gc.unfreeze``, which the context below calls on the way out.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager


@contextmanager
def startup_objects_frozen():
    """Inside the block, every object alive at its start (after one full collection) is frozen out of
    the garbage collector's full collections; on leaving, they are handed back (``gc.unfreeze``).
    Yields how many were frozen."""
    gc.collect()
    gc.freeze()
    try:
        yield gc.get_freeze_count()
    finally:
        gc.unfreeze()
