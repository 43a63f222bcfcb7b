"""TopoFlow library; `import topoflow` registers the model with the transformers Auto classes.

After this import, `AutoConfig.from_pretrained(folder)`, `AutoModel.from_pretrained(folder)` (the
encoder) and `topoflow.AutoModelForForecasting.from_pretrained(folder)` (encoder + head) use the
installed `configuration_topoflow` / `modeling_topoflow`, with no `trust_remote_code`; and
`TopoFlowForForecasting.from_pretrained("topoflow-base")` resolves the packaged model.
"""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForTimeSeriesPrediction,
)

from configuration_topoflow import TopoFlowConfig
from modeling_topoflow import (
    TopoFlowForecastOutput,
    TopoFlowForForecasting,
    TopoFlowModel,
    TopoFlowModelOutput,
    TopoFlowPreTrainedModel,
)
from topoflow.hub import register_hub_resolver, resolve_pretrained_path

__all__ = [
    "AutoModelForForecasting",
    "TopoFlowConfig",
    "TopoFlowForForecasting",
    "TopoFlowForecastOutput",
    "TopoFlowModel",
    "TopoFlowModelOutput",
    "TopoFlowPreTrainedModel",
]

__version__ = "0.1.0"


class AutoModelForForecasting(AutoModelForTimeSeriesPrediction):
    """The forecasting Auto class: TopoFlowForForecasting for TopoFlow configs.

    transformers has no forecasting Auto class for gridded fields; time-series prediction is the
    closest existing one. This subclass shares its registry and also resolves the packaged short
    names (`topoflow-base`) that the Auto classes alone would send to the Hub.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):  # noqa: ANN001
        resolved = resolve_pretrained_path(pretrained_model_name_or_path)
        return super().from_pretrained(resolved, *model_args, **kwargs)


# exist_ok: re-importing (e.g. importlib.reload in a notebook) must not fail.
AutoConfig.register(TopoFlowConfig.model_type, TopoFlowConfig, exist_ok=True)
AutoModel.register(TopoFlowConfig, TopoFlowModel, exist_ok=True)
AutoModelForForecasting.register(TopoFlowConfig, TopoFlowForForecasting, exist_ok=True)
register_hub_resolver()
