from setuptools import find_packages, setup

setup(
    name="shardshap",
    version="0.1.0",
    description="In-Run Data Shapley values computed during (sharded) training, streamed to Zarr stores",
    packages=find_packages(include=["shardshap", "shardshap.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pyyaml",
        "pydantic>=2",
        "zarr>=3.0",
        "numcodecs",
        "xarray",
        "dask",
        "tqdm",
        "rich",
        "matplotlib",
    ],
    extras_require={
        "hf": ["transformers>=4.56", "accelerate>=1.1"],
        "distributed": ["deepspeed", "mpi4py", "mpich"],
        "test": ["pytest", "ruff", "scikit-learn", "transformers>=4.56", "peft>=0.13"],
    },
    entry_points={"console_scripts": ["shardshap=shardshap.cli:main"]},
)
