/* CRC32 (the zlib/IEEE polynomial) of each fixed-size block of a buffer,
 * with the GIL released.
 *
 * Why: a node checksums every 4 KiB block it stores.  zlib.crc32 runs at
 * about 4 GB/s here and a Python loop over the blocks holds the GIL, which
 * made the checksums the largest single cost of the attached node's event
 * loop on sequential writes.  On x86-64 with PCLMULQDQ this folds 64 bytes
 * per step with carry-less multiplies (the method of Intel's paper "Fast CRC
 * Computation for Generic Polynomials Using PCLMULQDQ Instruction") and
 * finishes the last 128 bits with a table, so no Barrett reduction is needed.
 * Elsewhere it falls back to the same table, byte by byte.  The results are
 * bit-for-bit those of zlib.crc32, so the on-disk format does not change.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static uint32_t table[256];

static void make_table(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        table[n] = c;
    }
}

/* The CRC register after feeding n bytes; no pre- or post-inversion. */
static uint32_t crc_table(uint32_t c, const unsigned char *p, size_t n)
{
    while (n--)
        c = table[(c ^ *p++) & 0xff] ^ (c >> 8);
    return c;
}

static int have_clmul = 0;

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define PXFS_CLMUL 1

/* x folded forward over the distance that k encodes, xor the next 16 bytes.
 * Bit-reflected domain: the low 64 bits of x are the earlier message bits. */
__attribute__((target("pclmul,sse2")))
static inline __m128i fold(__m128i x, __m128i k, __m128i next)
{
    __m128i lo = _mm_clmulepi64_si128(x, k, 0x00);
    __m128i hi = _mm_clmulepi64_si128(x, k, 0x11);
    return _mm_xor_si128(_mm_xor_si128(lo, hi), next);
}

/* n >= 64.  Four 128-bit lanes run 64 bytes apart, then are folded into one;
 * the remaining 128 bits go through the table. */
__attribute__((target("pclmul,sse2")))
static uint32_t crc_clmul(uint32_t c, const unsigned char *p, size_t n)
{
    /* x^(4*128+32) and x^(4*128-32) mod P, bit-reflected (fold by 512 bits) */
    const __m128i k512 = _mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL);
    /* x^(128+32) and x^(128-32) mod P, bit-reflected (fold by 128 bits) */
    const __m128i k128 = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL);
    __m128i x0 = _mm_loadu_si128((const __m128i *)p);
    __m128i x1 = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i x2 = _mm_loadu_si128((const __m128i *)(p + 32));
    __m128i x3 = _mm_loadu_si128((const __m128i *)(p + 48));
    unsigned char rest[16];

    x0 = _mm_xor_si128(x0, _mm_cvtsi32_si128((int)c));
    p += 64;
    n -= 64;
    while (n >= 64) {
        x0 = fold(x0, k512, _mm_loadu_si128((const __m128i *)p));
        x1 = fold(x1, k512, _mm_loadu_si128((const __m128i *)(p + 16)));
        x2 = fold(x2, k512, _mm_loadu_si128((const __m128i *)(p + 32)));
        x3 = fold(x3, k512, _mm_loadu_si128((const __m128i *)(p + 48)));
        p += 64;
        n -= 64;
    }
    x1 = fold(x0, k128, x1);
    x2 = fold(x1, k128, x2);
    x3 = fold(x2, k128, x3);
    while (n >= 16) {
        x3 = fold(x3, k128, _mm_loadu_si128((const __m128i *)p));
        p += 16;
        n -= 16;
    }
    /* x3 has the residue of everything so far: its CRC is the message's */
    _mm_storeu_si128((__m128i *)rest, x3);
    c = crc_table(0, rest, 16);
    return crc_table(c, p, n);
}
#endif

/* The CRC32 of one block, as zlib.crc32(block) gives it. */
static uint32_t crc32_block(const unsigned char *p, size_t n)
{
#ifdef PXFS_CLMUL
    if (have_clmul && n >= 64)
        return ~crc_clmul(0xFFFFFFFFu, p, n);
#endif
    return ~crc_table(0xFFFFFFFFu, p, n);
}

/* Below this many bytes the GIL is kept: releasing it costs more. */
#define NOGIL_MIN (16 * 1024)

PyDoc_STRVAR(block_crcs_doc,
"block_crcs(data, block) -> bytes\n\n"
"The CRC32 of each block-sized piece of data, packed as native unsigned\n"
"32-bit integers (array('I') order).  len(data) must be a multiple of block.");

static PyObject *py_block_crcs(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    Py_ssize_t block, count;
    PyObject *out;

    if (!PyArg_ParseTuple(args, "y*n:block_crcs", &buf, &block))
        return NULL;
    if (block <= 0 || buf.len % block != 0) {
        PyErr_Format(PyExc_ValueError,
                     "block_crcs: length %zd is not a positive multiple of block %zd",
                     buf.len, block);
        PyBuffer_Release(&buf);
        return NULL;
    }
    count = buf.len / block;
    out = PyBytes_FromStringAndSize(NULL, count * 4);
    if (out == NULL) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    {
        const unsigned char *p = buf.buf;
        uint32_t *crcs = (uint32_t *)PyBytes_AS_STRING(out);
        PyThreadState *ts = NULL;
        if (buf.len >= NOGIL_MIN)
            ts = PyEval_SaveThread();
        for (Py_ssize_t i = 0; i < count; i++) {
            uint32_t r = crc32_block(p + i * block, (size_t)block);
            memcpy(crcs + i, &r, 4);
        }
        if (ts != NULL)
            PyEval_RestoreThread(ts);
    }
    PyBuffer_Release(&buf);
    return out;
}

static PyMethodDef methods[] = {
    {"block_crcs", py_block_crcs, METH_VARARGS, block_crcs_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pxfs.chunk._crc",
    "CRC32 of the blocks of a buffer without the GIL (see _crc.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__crc(void)
{
    PyObject *m;

    make_table();
#ifdef PXFS_CLMUL
    __builtin_cpu_init();
    have_clmul = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse2");
#endif
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "accelerated", have_clmul) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
