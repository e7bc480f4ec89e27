"""The public API of docs/ARCHITECTURE.md imports as documented: code written against it keeps working
when the package's insides move."""

import importlib

import pytest


@pytest.mark.parametrize(
    "module,names",
    [
        ("mpe.model", ["MultiPromptCLIP"]),
        ("mpe.losses", ["clip_loss", "siglip_loss", "diversity_loss", "negation_loss", "total_loss", "Dist"]),
        (
            "mpe.config",
            [
                "Params",
                "load_params",
                "ModelConfig",
                "TextConfig",
                "VisionConfig",
                "LossConfig",
                "DataConfig",
                "TrainConfig",
                "CacheConfig",
                "EvalConfig",
            ],
        ),
        ("mpe.model.configuration", ["ModelConfig", "TextConfig", "VisionConfig", "LossConfig", "StrictConfig"]),
        ("mpe.records", ["TrainingSummary", "to_mlflow", "from_mlflow", "EVAL", "TRAIN"]),
        *[
            (f"mpe.stages.{stage}", ["run"])
            for stage in ("sources", "data", "base_model", "cache", "train", "evaluate", "register", "reweight")
        ],
    ],
)
def test_the_documented_names_import(module, names):
    mod = importlib.import_module(module)
    missing = [n for n in names if not hasattr(mod, n)]
    assert not missing, f"{module} lacks {missing}"


def test_the_public_names_are_the_implementations():
    import mpe.losses
    import mpe.model.losses
    from mpe.config import ModelConfig
    from mpe.model import MultiPromptCLIP
    from mpe.model.configuration import ModelConfig as Own
    from mpe.model.multi_prompt_clip import MultiPromptCLIP as Impl

    assert MultiPromptCLIP is Impl and ModelConfig is Own
    assert all(getattr(mpe.losses, n) is getattr(mpe.model.losses, n) for n in mpe.model.losses.__all__)


def test_an_old_params_key_is_read_under_its_new_name():
    from mpe.config import Params

    with pytest.warns(DeprecationWarning, match="metrics_dir"):
        p = Params.model_validate({"evaluate": {"out_dir": "m"}})
    assert p.metrics_dir == "m"
