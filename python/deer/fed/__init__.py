"""Federated private LoRA fine-tuning: DEeR, FFA-LoRA, FedAvg-LoRA (in-process engine and Flower)."""
from .config import METHODS, FedConfig, MethodSpec, load_config, method_spec  # noqa: F401
from .engine import Job, prepare_job, run, run_method  # noqa: F401
