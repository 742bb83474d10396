"""The runtimes ``style_fusion`` is served and registered with: one adapter module each, one row each in
:data:`RUNTIMES`.

Each adapter translates its protocol (envelopes, status codes, streaming mechanism) onto the serving core
(:class:`nsf.serving.Worker`, :class:`nsf.serving.Runner`) and nothing else; what they share is
:mod:`.common`. No adapter imports another, and importing this package imports none of them (nor a server
library): the CLI reads this table and imports the one module a command needs.

Adding a runtime: one module here with ``serve_main(args) -> int`` (``nsf serve --runtime NAME``) and/or
``export_main(args) -> int`` (``nsf export NAME``), and one row below.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Runtime:
    """One runtime: its adapter module, what it is, and which commands it takes part in."""

    module: str
    summary: str
    serves: bool = False  # ``nsf serve --runtime NAME`` -> the module's serve_main(args)
    exports: bool = False  # ``nsf export NAME`` -> the module's export_main(args)
    archives: bool = False  # ``nsf archive`` -> the module's archive_main(args)
    extra: str = ""  # the setup.cfg extra it needs


RUNTIMES: dict[str, Runtime] = {
    "torchserve": Runtime("nsf.runtimes.torchserve", "the .mar under TorchServe (Java 17): multipart, JSON, KServe "
                          "envelopes, streaming", serves=True, archives=True, extra="serve"),
    "kserve": Runtime("nsf.runtimes.kserve", "KServe's Python model server: KServe v1 (streaming) and v2",
                      serves=True, extra="kserve"),
    "mlflow": Runtime("nsf.runtimes.mlflow", "a registered MLflow model (models from code); mlflow models serve",
                      exports=True, extra="mlflow"),
}
SERVING = [name for name, r in RUNTIMES.items() if r.serves]
EXPORTING = [name for name, r in RUNTIMES.items() if r.exports]
ARCHIVING = [name for name, r in RUNTIMES.items() if r.archives]
DEFAULT_SERVING = "torchserve"

__all__ = ["ARCHIVING", "DEFAULT_SERVING", "EXPORTING", "RUNTIMES", "SERVING", "Runtime"]
