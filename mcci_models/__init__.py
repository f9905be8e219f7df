"""Networks only: the SFRN (a timm backbone), the AIN (a spectrum CNN) and the fused MCCI model."""
from mcci_models.ain import AttackIndicationNetwork
from mcci_models.factory import DEFENSES, create_model
from mcci_models.mcci import MCCI, REFERENCE_KINDS
from mcci_models.sfrn import ModelError, create_sfrn

__all__ = ["AttackIndicationNetwork", "DEFENSES", "MCCI", "REFERENCE_KINDS", "ModelError", "create_model", "create_sfrn"]
