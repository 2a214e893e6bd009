"""gr2_jax: Generative Reasoning Re-ranker (GR2) in JAX."""
from setuptools import find_packages, setup

setup(
    name="gr2_jax",
    version="0.1.0",
    description="JAX/TPU-native Generative Reasoning Re-ranker: semantic-ID tokenizer, "
    "mid-training, reasoning traces, SFT and RL with verifiable rewards.",
    packages=find_packages(include=["gr2_jax", "gr2_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "tensorflow-datasets>=4.9.8",
        "importlib_resources",  # tfds builders import it lazily
        "array_record>=0.7",
        "sentencepiece>=0.2",
        "numpy>=1.26",
        "absl-py>=2.1",
        "ml-collections>=1.0",
        "pandas>=2.0",
        "pyarrow>=15",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "gguf>=0.10",  # llama.cpp's GGUF reader (gr2_jax.models.gguf_io)
        "tensorboardX>=2.6",
        "lightgbm>=4.3",  # LambdaMART baseline (gr2_jax.rankers.lambdamart)
        "rax>=0.4",  # listwise losses of the PRM baseline (gr2_jax.rankers.prm)
        "fastapi>=0.110",  # the re-ranking server (gr2_jax.serve)
        "uvicorn>=0.29",
        "httpx>=0.27",  # the server's load test client
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            # CPU build of PyTorch for the reference-parity tests; never unpinned.
            "torch==2.13.0",
            "transformers>=4.51",
            "accelerate>=1.0",  # transformers needs it to load GGUF files
            "sentence-transformers>=3.0",
            "scipy>=1.11",
            "openai>=1.30",  # the server's OpenAI-compatibility test uses the official client
            "pyyaml>=6",  # the GKE JobSet in launch/ is parsed
            "apache-beam>=2.60",  # the Beam slates build is compared with the in-memory one
        ],
        # The impressions source's slates build as an Apache Beam pipeline (data.beam_runner).
        "beam": ["apache-beam>=2.60"],
        # Cloud TPU VMs and GKE TPU pods (launch/): the TPU build of JAX.
        "tpu": ["jax[tpu]>=0.6"],
        # NVIDIA GPUs.
        "cuda": ["jax[cuda12]>=0.6"],
    },
)
