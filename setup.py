"""Install TopoFlow: the Hub files, the training script and the `topoflow` library."""

from pathlib import Path

from setuptools import find_packages, setup

# torch is deliberately unpinned: GPU users keep the CUDA build they have; CPU machines install
# torch==2.13.0 first (see README), which satisfies this range without pulling a CUDA build.
INSTALL_REQUIRES = [
    "torch>=2.5",
    "transformers>=5.0,<6",
    "accelerate>=1.10",
    # topoflow/data/streaming.py subclasses datasets.iterable_dataset.ExamplesIterable, which is
    # not public API: allow only the major versions it was tested with.
    "datasets>=4.0,<6",
    "safetensors>=0.4",
    "huggingface-hub>=1.0",
    "numpy>=1.26",
    "scipy>=1.11",  # the seed-level and sample-level tests (topoflow.seed_stats, topoflow.stats)
    "pyarrow>=17",
    "pyyaml>=5.1",
    "matplotlib>=3.8",
    "tensorboard>=2.15",
    # attention_topoflow.py compiles its fused CPU attention kernel on first use with
    # torch.utils.cpp_extension, which drives the build with ninja (and needs a C++ compiler).
    "ninja>=1.11",
]

EXTRAS_REQUIRE = {
    # Reading CAQRA-style yearly Zarr / NetCDF reanalysis files.
    "caqra": ["zarr>=3", "h5netcdf>=1.3", "h5py>=3.10", "xarray>=2024.1"],
    # A local Hub-compatible server for the round-trip test.
    "hubserver": ["olah>=0.5"],
}
EXTRAS_REQUIRE["tests"] = [
    "pytest>=8",
    "ruff>=0.6",
    *EXTRAS_REQUIRE["caqra"],
    *EXTRAS_REQUIRE["hubserver"],
]
EXTRAS_REQUIRE["dev"] = EXTRAS_REQUIRE["tests"]

setup(
    name="topoflow",
    version="0.1.0",
    description="Topography-aware air-quality forecasting with a ClimaX-style Vision Transformer",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["topoflow", "topoflow.*"]),
    py_modules=[
        "attention_topoflow",
        "configuration_topoflow",
        "modeling_topoflow",
        "train_accelerate",
    ],
    # Card templates and the packaged models are read at run time: a wheel must carry them.
    package_data={"topoflow": ["hub_cards/*.md", "pretrained/*/*", "pretrained/*/*/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["topoflow=topoflow.cli:main"]},
)
