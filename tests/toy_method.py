"""A toy quantization method: the "one module" of "adding a method = one module + one registry entry".

It "quantizes" nothing: it copies the weights and declares a ``quantization_config``. Enough for
the shared pipeline (validation, atomic output, model card, provenance) and for every place that
reads the method registry (CLI, plan, provision) to prove they take a new method without edits.
"""

from __future__ import annotations

import json
import shutil

from qtk.quantize.base import Method, QuantizeOptions, RunContext


class Toy(Method):
    name = "toy"
    description = "toy method for the registry test: copies the weights"
    bits = (2, 3)
    needs_calibration = False
    uses_group_size = False
    distribution = "qtk"
    modules = ()
    extra = "test"
    devices = ("cpu",)

    def expected_config(self, options: QuantizeOptions) -> dict:
        return {"quant_method": "toy", "bits": options.bits}

    def run(self, ctx: RunContext) -> None:
        for f in ctx.model.weight_files:
            shutil.copyfile(f, ctx.out / f.name)
        cfg = dict(ctx.model.config, quantization_config=self.expected_config(ctx.options))
        (ctx.out / "config.json").write_text(json.dumps(cfg))


class ToyBroken(Toy):
    """Chatters like a backend, then fails inside the backend."""

    name = "toy-broken"

    def run(self, ctx: RunContext) -> None:
        import logging
        import os
        import sys

        print("backend banner on stdout")
        print("backend progress on stderr", file=sys.stderr)
        logging.getLogger("toy.backend").warning("backend logger warning")
        os.write(2, b"native library chatter\n")
        raise RuntimeError("backend exploded in layer 3")
