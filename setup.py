"""Install megatron_llama; compile csrc/helpers.cpp with pybind11 when a compiler is present.

Without a compiler (or without pybind11) the install still succeeds and
megatron_llama.data.helpers falls back to numpy code with identical output.
"""
from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build the C++ helpers if possible; never fail the install because of them."""

    def run(self):
        try:
            super().run()
        except Exception as error:  # noqa: BLE001 - any compiler failure means "use numpy"
            print(f"megatron_llama: C++ helpers not built ({error}); using the numpy fallback")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as error:  # noqa: BLE001
            print(f"megatron_llama: C++ helpers not built ({error}); using the numpy fallback")


def helper_extensions():
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        print("megatron_llama: pybind11 not installed; using the numpy fallback for dataset indices")
        return []
    return [Pybind11Extension("megatron_llama.data._helpers", ["csrc/helpers.cpp"], cxx_std=17, extra_compile_args=["-O3"])]


setup(
    name="megatron_llama",
    version="0.1.0",
    description="Megatron-style Llama pretraining: data pipeline, 3D parallelism, Hugging Face export",
    packages=find_packages(include=["megatron_llama", "megatron_llama.*"]),
    python_requires=">=3.10",
    install_requires=["numpy", "sentencepiece", "zstandard", "safetensors", "tokenizers", "protobuf"],
    extras_require={
        "serve": ["fastapi", "uvicorn"],
        "test": ["pytest", "transformers", "tokenizers", "tensorboard", "fastapi", "uvicorn", "openai", "selenium",
                 "trl"],
    },
    package_data={"megatron_llama.inference": ["chat_page.html"]},
    ext_modules=helper_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
)
