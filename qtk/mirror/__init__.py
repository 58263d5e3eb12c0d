"""``qtk serve``: a Hub-compatible server over a directory of repos (plain folders, a ``qtk provision``
store, an HF cache), beside the client in :mod:`qtk.hub`.

It uses the client's name rules (:mod:`qtk.hub.names`) and qtk's errors, and never imports
:mod:`qtk.provision`: the provision store's published and kept versions come in through
:class:`~qtk.mirror.store.PublishedVersions`, which ``qtk serve`` (the CLI) builds (tests/test_layering.py).
"""
