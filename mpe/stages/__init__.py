"""The pipeline's stages, one module each: ``run(params, ...) -> summary``. A stage reads its params keys
and files, calls the library, and writes its outputs (file names: ``mpe.records``); no stage imports
another. ``dvc.yaml`` runs six of them in order (``mpe <stage>``) and lists exactly the keys and modules
each one reads (``tests/unit/test_architecture.py`` keeps it so). ``register`` runs in the retrain flow
after ``dvc push``, and ``reweight`` is an analysis run on demand: neither is a DVC stage."""
