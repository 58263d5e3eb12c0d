"""qtk's named texts (calibration and evaluation), kept at the top of the repository and shipped in the
wheel as the package ``qtk.calibration`` (setup.py maps this folder there; pyproject.toml's package-data
lists the files). :mod:`qtk.texts` reads them through :mod:`importlib.resources`:

    texts.json          the named sets: what each is, its recipe, license and pinned sha256 per Python
    chat-seed.jsonl     12 conversations written for qtk (Apache-2.0), the seed of the ``chat`` set

Nothing here is code: this file only makes the folder a package that editable installs can map.
"""
