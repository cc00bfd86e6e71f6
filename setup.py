"""Only the C helpers live here; everything else is in setup.cfg."""
from setuptools import Extension, setup

setup(ext_modules=[
    # optional: without a compiler pxfs falls back to zlib.crc32 per block
    Extension("pxfs.chunk._crc", ["pxfs/chunk/_crc.c"], optional=True,
              extra_compile_args=["-O2", "-std=c11"]),
    # FUSE lock requests for shared volumes (pyfuse3 has no lock handlers);
    # needs libfuse3-dev, which pyfuse3 needs too
    Extension("pxfs.fuse._lockops", ["pxfs/fuse/_lockops.c"], libraries=["fuse3"],
              extra_compile_args=["-O2", "-std=gnu11", "-fvisibility=hidden"]),
])
