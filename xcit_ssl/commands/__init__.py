"""The commands tier: one module per ``xcit-ssl`` command, each parse -> call the library -> print
and write. :mod:`xcit_ssl.cli` dispatches here; nothing else in the package imports this folder.

- :mod:`.fit` (+ :mod:`.fit_help`): ``fit``, LightningCLI with recipes and run folders;
- :mod:`.evaluate`: ``knn`` and ``linear``; :mod:`.summary`: ``summary``;
- :mod:`.validate`: ``validate``; :mod:`.export`: ``export``; :mod:`.shard`: ``shard``;
- :mod:`.analysis`: ``attention`` and ``plot``; :mod:`.doctor`: ``doctor``;
- :mod:`.listing`: ``recipes``, ``protocols``, ``models``;
- :mod:`.weights_flags`: the weight flags knn, linear, attention and validate share.
"""
