"""The MLflow pyfunc of a trained model, logged as *models from code*: MLflow stores this file and
the model folder as artifacts and never pickles or unpickles a Python object.

Input: a DataFrame with a ``text`` column (strings), an ``image`` column (base64-encoded image bytes) and/or
a ``video`` column (base64-encoded video file bytes); each row carries one of them (``mpe.serving.request``
checks and embeds them). Output: one
L2-normalised embedding per row.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


class MultiPromptEmbedder(PythonModel):
    def load_context(self, context):
        from mpe.model.multi_prompt_clip import MultiPromptCLIP

        self.model = MultiPromptCLIP.from_pretrained(context.artifacts["mpe_model"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        from mlflow.exceptions import MlflowException

        from mpe.errors import DataError
        from mpe.serving.request import embed_rows

        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        try:
            return embed_rows(self.model, df)
        except DataError as err:
            # MLflow's scoring server answers an MlflowException with its status (400 here) and message;
            # any other exception becomes a 400 whose message hides ours in a traceback
            raise MlflowException.invalid_parameter_value(str(err)) from None


mlflow.models.set_model(MultiPromptEmbedder())
