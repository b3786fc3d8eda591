"""Model adapters: each turns one model family into the runtime's :class:`~ttaperso.model.FERModel`.

Installed as ``ttaperso.adapters`` (the folder sits at the repository's top level).
"""
