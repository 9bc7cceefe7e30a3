"""fdistill: one-step diffusion distillation by f-divergence distribution matching, in JAX/Flax."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorflow-datasets==4.9.10",
    "importlib_resources==7.1.0",  # imported by tfds without being declared
    "ml-collections==1.1.0",
    "clu==0.0.12",
    "tensorflow-cpu==2.21.0",  # clu.metric_writers / periodic_actions import it
    "tensorboard==2.21.0",
    "numpy==2.4.6",
    "scipy==1.17.1",
    "scikit-learn==1.9.1",
    "pillow==13.0.0",
    "absl-py==2.5.1",
]

setup(
    name="fdistill",
    version="0.1.0",
    description="One-step diffusion distillation by f-divergence distribution matching (JAX/Flax NNX).",
    # The one place the repository's address is written: the notebooks' install cells and the
    # README's Colab badges follow it (python notebooks/set_repository_url.py).
    url="https://github.com/fdistill/fdistill",
    packages=find_packages(include=["fdistill", "fdistill.*", "configs"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0",
                 "matplotlib==3.11.2", "torch==2.13.0"],
        # Reading EDM's snapshot pickles (fdistill.models.edm_import); nothing else needs torch.
        "edm": ["torch==2.13.0"],
        "notebooks": ["matplotlib==3.11.2", "nbclient==0.11.0",
                      "nbformat==5.11.1", "ipykernel==7.4.0"],
    },
)
