"""The MLflow pyfunc of a trained model, logged as *models from code*: MLflow stores this file and
the model folder as artifacts and never pickles or unpickles a Python object.

Input: a DataFrame with a ``text`` column (strings) and/or an ``image`` column (base64-encoded image
bytes); each row carries one of the two. Output: one L2-normalised embedding per row.
"""

from __future__ import annotations

import base64
import io

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


class MultiPromptEmbedder(PythonModel):
    def load_context(self, context):
        from mpe.model import MultiPromptCLIP

        self.model = MultiPromptCLIP.from_pretrained(context.artifacts["mpe_model"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        import torch
        from PIL import Image

        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        n = len(df)
        texts = df["text"] if "text" in df else pd.Series([None] * n)
        images = df["image"] if "image" in df else pd.Series([None] * n)
        text_rows = [i for i in range(n) if isinstance(texts.iloc[i], str)]
        image_rows = [i for i in range(n) if i not in set(text_rows) and _present(images.iloc[i])]
        missing = sorted(set(range(n)) - set(text_rows) - set(image_rows))
        if missing:
            raise ValueError(f"rows {missing[:10]} have neither a 'text' string nor an 'image' (base64)")
        out = np.zeros((n, self.model.cfg.embed_dim), dtype=np.float32)
        with torch.no_grad():
            if text_rows:
                out[text_rows] = self.model.encode_text([texts.iloc[i] for i in text_rows]).float().numpy()
            if image_rows:
                pil = []
                for i in image_rows:
                    raw = images.iloc[i]
                    try:
                        data = base64.b64decode(raw) if isinstance(raw, str) else bytes(raw)
                        pil.append(Image.open(io.BytesIO(data)).convert("RGB"))
                    except Exception as err:
                        raise ValueError(f"row {i}: 'image' is not base64-encoded image bytes ({err})") from None
                out[image_rows] = self.model.encode_image(pil).float().numpy()
        return out


def _present(v) -> bool:
    return v is not None and not (isinstance(v, float) and np.isnan(v)) and len(v) > 0


mlflow.models.set_model(MultiPromptEmbedder())
