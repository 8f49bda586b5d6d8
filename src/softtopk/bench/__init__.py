"""softtopk-bench: the one benchmark harness of softtopk (``softtopk-bench --help``).

One registry of cases (:mod:`.cases`, peers in :mod:`.peers`), one runner (:mod:`.run`: a warm-up call, the peak
memory of one call, then interleaved timing), one JSON document per run, and one report writer (:mod:`.report`,
:mod:`.plots`) that produces every benchmark table of the README and the site from that document.

It lives inside the package, not beside it, so that anyone can measure softtopk where they run it:
``pip install 'softtopk[bench]'`` then ``softtopk-bench --quick``, or ``--device cuda`` on a GPU machine, without
a clone of the repository. A target met on one CPU and missed on another is missed, so the measuring tool ships
with the library. Nothing here is imported by ``import softtopk``; matplotlib, tqdm and the peers load only when
a run needs them.
"""

from .cli import main

__all__ = ["main"]
