"""Serving the trained model: one embedding request's rows, the MLflow pyfunc, ``mpe serve`` (HTTP), and
embedding files from the command line."""
