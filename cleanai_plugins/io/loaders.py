"""Built-in loaders for the command line, by stage: models (:mod:`.models`), data sets
(:mod:`.datasets`), the classification evaluator (:mod:`.evaluation`); the demo's data and
model live in :mod:`.demo`. This module keeps the helper names importable from one place;
it registers no hooks itself."""

from cleanai_plugins.io.datasets import (
    DATA_FORMS,
    LabelledTensors,
    class_labels,
    label_indices,
    load_dataset,
    not_class_labels,
    read_npz,
)
from cleanai_plugins.io.models import MODEL_FORMS, build_model, call_spec, finish_model, load_state_dict_file

__all__ = [
    "DATA_FORMS",
    "MODEL_FORMS",
    "LabelledTensors",
    "build_model",
    "call_spec",
    "class_labels",
    "finish_model",
    "label_indices",
    "load_dataset",
    "load_state_dict_file",
    "not_class_labels",
    "read_npz",
]
