"""Serve personalization over HTTP: ``ttaperso serve`` (see docs/serving.md).

* :mod:`.service`: :class:`SubjectService`, a Personalizer bound to a store with a save
  policy and per-subject versions (what one process or one Ray replica runs);
* :mod:`.app`: the FastAPI application (auth, limits, decoding, metrics, error mapping);
* :mod:`.ray_backend`: Ray Serve replicas routed by subject id;
* :mod:`.local`: a loopback ``redis-server`` for tests and experiments.

Needs the ``serve`` extra: ``pip install 'ttaperso[serve]'``.
"""

from __future__ import annotations

__all__: list[str] = []
