"""The MLflow "model from code" script of ``style_fusion``: logged by :func:`nsf.runtimes.mlflow.log_model`.

MLflow runs this file when it loads a registered version (``mlflow.pyfunc.load_model``, ``mlflow
models serve``); the ``nsf`` code packed with the version is first on ``sys.path`` then. Nothing is
unpickled: the worker is built from this code, the VGG-19 weights artifact (sha256 checked, loaded
with ``weights_only=True``) and the packed ``model-config.yaml``. The library never imports this
module (it imports MLflow).
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel, PythonModelContext

from nsf.runtimes import mlflow as runtime


class StyleFusionPyfunc(PythonModel):
    """``predict(frame, params)``: one stylized image (bytes) per row of content/style images, answered by the
    serving core's worker (admission, batching, deadline, the servers' errors)."""

    def load_context(self, context: PythonModelContext) -> None:
        self.runner = runtime.start_worker(context.artifacts)

    # No type hints here: MLflow reads predict's hints as a signature (the logged one, with binary
    # columns and params, is the contract).
    def predict(self, context, model_input, params=None):
        return runtime.predict_rows(self.runner, model_input, params)


mlflow.models.set_model(StyleFusionPyfunc())
