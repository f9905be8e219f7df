"""Networks only: the SFRN (a timm backbone), the AIN (a spectrum CNN), the fused MCCI model, and
reading a trained model's folder. Imports nothing from this project outside this package."""
from mcci_models.ain import AttackIndicationNetwork
from mcci_models.factory import AIN_VIEWS, DEFENSES, ain_in_chans, create_model, fit_ain
from mcci_models.mcci import MCCI, REFERENCE_KINDS
from mcci_models.saved import create_model_from_config, default_device, load_saved_model
from mcci_models.sfrn import ModelError, create_sfrn, sfrn_data_config

__all__ = ["AIN_VIEWS", "AttackIndicationNetwork", "DEFENSES", "MCCI", "REFERENCE_KINDS", "ModelError", "ain_in_chans",
           "create_model", "create_model_from_config", "create_sfrn", "default_device", "fit_ain", "load_saved_model",
           "sfrn_data_config"]
