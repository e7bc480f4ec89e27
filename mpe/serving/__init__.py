"""Serving the trained model: one embedding request's rows, the MLflow pyfunc, the model card, the search
index and ``/search`` with its page, ``mpe serve`` (HTTP), and embedding files from the command line."""
