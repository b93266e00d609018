"""lmms-eval's legacy plugin registry reads ``AVAILABLE_MODELS`` here (``{name: class}`` in ``models.<name>``)."""

AVAILABLE_MODELS = {"mmprune": "MmpruneLMM"}


def manifest():
    """The ``lmms_eval.models`` entry point (``pyproject.toml``): ``--model mmprune`` without LMMS_EVAL_PLUGINS."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="mmprune", simple_class_path="mmprune.integrations.lmms_eval.models.mmprune.MmpruneLMM")
