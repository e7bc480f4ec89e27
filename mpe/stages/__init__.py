"""The pipeline's stages, one module each: ``run(params) -> summary``. A stage reads its params keys and
files, calls the library, and writes its outputs; no stage imports another. ``dvc.yaml`` runs them
(``mpe <stage>``) and lists exactly the keys and modules each one reads (tests/unit/test_dvc_deps.py)."""
