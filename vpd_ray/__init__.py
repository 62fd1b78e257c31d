"""vpd_ray: VPD perception models (Stable Diffusion's UNet as a backbone) on Ray Train + DeepSpeed.

Heavy dependencies (torch, diffusers, ray, deepspeed) are imported where used, so that
``import vpd_ray`` stays fast and the command-line entry points can validate a config
before paying for them.
"""

__version__ = "0.1.0"
