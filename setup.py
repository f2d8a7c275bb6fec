"""One distribution, import name ``tokenlabel``; the top-level folders map into it.

``kernels/`` -> ``tokenlabel.kernels`` and so on (package_dir), so nothing generic such as
``models`` lands in site-packages.
"""
from setuptools import setup

PARTS = ("kernels", "models", "dataloading", "bench")

setup(
    name="tokenlabel",
    version="0.1.0",
    description="Fused-kernel token labeling (LV-ViT) for NVIDIA GPUs: Triton loss, LV-ViT models, DALI loading",
    python_requires=">=3.10",
    packages=["tokenlabel"] + [f"tokenlabel.{p}" for p in PARTS],
    package_dir={"tokenlabel": "tokenlabel", **{f"tokenlabel.{p}": p for p in PARTS}},
    package_data={"tokenlabel.bench": ["results/*.csv", "results/*.png", "results/README.md"], "tokenlabel": ["configs/*.yaml"]},
    # torch is deliberately not pulled in here: pip would fetch a multi-GB CUDA build on machines
    # that already have the right one. Install torch (and triton, which ships with CUDA torch) first.
    install_requires=["numpy", "pillow", "tqdm", "pyyaml"],
    extras_require={
        "dali-cu13": ["nvidia-dali-cuda130"],
        "dali-cu12": ["nvidia-dali-cuda120"],
        "xformers": ["xformers==0.0.35"],
        "bench": ["matplotlib", "pytest-benchmark"],
        "dev": ["pytest", "pytest-benchmark", "matplotlib", "scipy"],
    },
    entry_points={"console_scripts": ["tokenlabel=tokenlabel.cli:main"]},
)
