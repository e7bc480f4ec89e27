"""The MLflow pyfunc of a trained model, logged as *models from code*: MLflow stores this file and
the model folder as artifacts and never pickles or unpickles a Python object.

Input: a DataFrame with a ``text`` column (strings) and/or an ``image`` column (base64-encoded image
bytes); each row carries one of the two (``mpe.serving.request`` checks and embeds them, under the
limits of ``mpe serve``: ``ServeConfig``'s defaults, or the ``model_config`` given to ``load_model``).
Output: one L2-normalised embedding per row.
"""

from __future__ import annotations

import logging

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

log = logging.getLogger("mpe.serve")


class MultiPromptEmbedder(PythonModel):
    def load_context(self, context):
        from mpe.config import ServeConfig
        from mpe.model.configuration import validate
        from mpe.model.multi_prompt_clip import MultiPromptCLIP

        self.model = MultiPromptCLIP.from_pretrained(context.artifacts["mpe_model"])
        # mlflow.pyfunc.load_model(uri, model_config={"max_rows": 64}) tightens a limit; unknown keys are named
        self.limits = validate(ServeConfig, dict(context.model_config or {}), "the pyfunc's model_config")

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INTERNAL_ERROR

        from mpe.errors import DataError
        from mpe.serving.request import embed_rows

        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        try:
            return embed_rows(self.model, df, self.limits)
        except DataError as err:
            # MLflow's scoring server answers an MlflowException with its status (400 here) and message;
            # any other exception becomes a 400 whose body carries the server's traceback
            raise MlflowException.invalid_parameter_value(str(err)) from None
        except Exception:  # our failure, not the client's: the traceback stays in the server's log
            log.exception("embedding failed")
            raise MlflowException(
                "the model failed to embed this request; see the server's log", error_code=INTERNAL_ERROR
            ) from None


mlflow.models.set_model(MultiPromptEmbedder())
