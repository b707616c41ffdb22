from setuptools import find_packages, setup

setup(
    name="loam",
    version="0.1.0",
    description="JAX research codebase for data-centric language-model pretraining",
    python_requires=">=3.11",
    packages=find_packages(include=["loam", "loam.*"]),
    package_data={"loam": ["data/bundled/*", "data/NOTICE"]},
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.10",
        "ml-collections>=0.1.1",
        "numpy>=1.26",
        "sentencepiece>=0.2",
        "tensorboard>=2.16",
        "seqio>=0.0.19",
        "tensorflow-datasets>=4.9",
        "tensorflow>=2.16",
        "matplotlib>=3.8",
        "scipy>=1.11",
        "absl-py",
        "lightgbm>=4.0",
        # tfds 4.9 imports it on every Python but declares it only for Python < 3.9.
        "importlib_resources",
    ],
    extras_require={"dev": ["pytest>=8", "pytest-timeout"]},
)
