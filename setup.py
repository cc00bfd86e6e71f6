"""Only the C helper lives here; everything else is in setup.cfg."""
from setuptools import Extension, setup

# optional: without a compiler pxfs falls back to zlib.crc32 per block
setup(ext_modules=[Extension("pxfs.chunk._crc", ["pxfs/chunk/_crc.c"], optional=True,
                             extra_compile_args=["-O2", "-std=c11"])])
