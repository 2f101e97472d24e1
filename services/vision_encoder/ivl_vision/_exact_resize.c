/* Pillow's BICUBIC resize of 8-bit images, the same bytes, in loops the compiler vectorises.

   ivl_vision/exact_resize.py wraps it; docs/tiling.md says why it is exact. In short: the filter
   coefficients are computed as Pillow's precompute_coeffs computes them (double precision, the same
   operations in the same order, no contraction into FMA: built with -ffp-contract=off), then rounded
   to the same 22-bit fixed point; every output value is the same int32 sum of the same products,
   rounded and clipped the same way. An integer sum does not depend on its order, so summing 48 rows
   at once (horizontal pass) or a whole row at once (vertical pass) gives Pillow's bytes. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define PRECISION_BITS (32 - 8 - 2)
#define HALF (1 << (PRECISION_BITS - 1))
#define LANES 48 /* int32 lanes of one horizontal block: 16 RGB rows, 48 L rows, 12 RGBA rows */

/* x86-64 builds carry an AVX2 copy of the two hot loops, chosen at load time (glibc ifunc). */
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define HOT __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef HOT
#define HOT
#endif

static inline uint8_t clip8(int32_t v)
{
    v >>= PRECISION_BITS;
    return v < 0 ? 0 : (v > 255 ? 255 : (uint8_t)v);
}

static double bicubic(double x)
{
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

/* Pillow's precompute_coeffs + normalize_coeffs_8bpc for BICUBIC without a box: bounds[2i] is the first
   source index of output i, bounds[2i+1] the count; coefs[i * ksize + k]. Returns ksize, or -1 (no memory). */
static int coefficients(int in_size, int out_size, int32_t **bounds_out, int32_t **coefs_out)
{
    double scale = (double)in_size / out_size, filterscale = scale < 1.0 ? 1.0 : scale;
    double support = 2.0 * filterscale, ss = 1.0 / filterscale;
    int ksize = (int)ceil(support) * 2 + 1;
    int32_t *bounds = malloc(sizeof(int32_t) * 2 * (size_t)out_size);
    int32_t *coefs = malloc(sizeof(int32_t) * (size_t)ksize * out_size);
    double *k = malloc(sizeof(double) * ksize);
    if (!bounds || !coefs || !k) {
        free(bounds);
        free(coefs);
        free(k);
        return -1;
    }
    for (int xx = 0; xx < out_size; xx++) {
        double center = (xx + 0.5) * scale, ww = 0.0;
        int xmin = (int)(center - support + 0.5), xmax;
        if (xmin < 0) xmin = 0;
        xmax = (int)(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        for (int x = 0; x < xmax; x++) {
            double w = bicubic((x + xmin - center + 0.5) * ss);
            k[x] = w;
            ww += w;
        }
        for (int x = 0; x < ksize; x++) {
            double v = x < xmax ? (ww != 0.0 ? k[x] / ww : k[x]) : 0.0;
            coefs[(size_t)xx * ksize + x] = v < 0 ? (int32_t)(-0.5 + v * (1 << PRECISION_BITS))
                                                  : (int32_t)(0.5 + v * (1 << PRECISION_BITS));
        }
        bounds[2 * xx] = xmin;
        bounds[2 * xx + 1] = xmax;
    }
    free(k);
    *bounds_out = bounds;
    *coefs_out = coefs;
    return ksize;
}

/* One block's lanes: t[x * LANES + r * CH + c] = channel c of pixel x of block row r. Rows past the band
   repeat its last row (their sums are never stored). Constant loop bounds per channel count: this is the
   loop the compiler unrolls. */
#define TRANSPOSE(CH)                                                                     \
    do {                                                                                  \
        const uint8_t *lines[LANES / CH];                                                 \
        for (int r = 0; r < LANES / CH; r++)                                              \
            lines[r] = src + (size_t)(top + (r < rows ? r : rows - 1)) * width * CH;      \
        for (int x = 0; x < width; x++) {                                                 \
            int32_t *lane = t + (size_t)x * LANES;                                        \
            for (int r = 0; r < LANES / CH; r++)                                          \
                for (int c = 0; c < CH; c++) lane[r * CH + c] = lines[r][x * CH + c];     \
        }                                                                                 \
    } while (0)

/* Rows [row0, row1) of src (height x width x channels) -> the same rows of dst (height x out_width x channels). */
HOT static void horizontal(const uint8_t *src, int width, int channels, int row0, int row1, int out_width,
                           const int32_t *bounds, const int32_t *coefs, int ksize, uint8_t *dst, int32_t *t)
{
    int block = LANES / channels;
    for (int top = row0; top < row1; top += block) {
        int rows = row1 - top < block ? row1 - top : block;
        if (channels == 3) TRANSPOSE(3);
        else if (channels == 1) TRANSPOSE(1);
        else if (channels == 4) TRANSPOSE(4);
        else TRANSPOSE(2);
        for (int xx = 0; xx < out_width; xx++) {
            int32_t acc[LANES];
            for (int j = 0; j < LANES; j++) acc[j] = HALF;
            const int32_t *k = coefs + (size_t)xx * ksize;
            const int32_t *column = t + (size_t)bounds[2 * xx] * LANES;
            int count = bounds[2 * xx + 1];
            for (int x = 0; x < count; x++) {
                int32_t w = k[x];
                const int32_t *v = column + (size_t)x * LANES;
                for (int j = 0; j < LANES; j++) acc[j] += v[j] * w;
            }
            uint8_t *out = dst + ((size_t)top * out_width + xx) * channels;
            for (int r = 0; r < rows; r++)
                for (int c = 0; c < channels; c++) out[(size_t)r * out_width * channels + c] = clip8(acc[r * channels + c]);
        }
    }
}

/* Columns [col0, col1) of src (height x width x channels, interleaved) -> the same columns of the planar
   dst (channels x out_height x width). */
HOT static void vertical(const uint8_t *src, int width, int channels, int col0, int col1, int out_height,
                         const int32_t *bounds, const int32_t *coefs, int ksize, uint8_t *dst, int32_t *acc)
{
    int n = (col1 - col0) * channels;
    for (int yy = 0; yy < out_height; yy++) {
        for (int j = 0; j < n; j++) acc[j] = HALF;
        const int32_t *k = coefs + (size_t)yy * ksize;
        int ymin = bounds[2 * yy], count = bounds[2 * yy + 1];
        for (int y = 0; y < count; y++) {
            int32_t w = k[y];
            const uint8_t *line = src + ((size_t)(ymin + y) * width + col0) * channels;
            for (int j = 0; j < n; j++) acc[j] += (int32_t)line[j] * w;
        }
        for (int c = 0; c < channels; c++) {
            uint8_t *plane = dst + ((size_t)c * out_height + yy) * width + col0;
            for (int x = 0; x < col1 - col0; x++) plane[x] = clip8(acc[x * channels + c]);
        }
    }
}

/* One pass over a band: parse (src, height, width, channels, first, last, out_size, dst), check the sizes and
   the buffer lengths, compute the coefficients along the pass's axis and run it with the GIL released.
   horizontal_pass: the band is rows [first, last), out_size the output width, dst (height, out_size, channels);
   vertical_pass: the band is columns [first, last), out_size the output height, dst planar (channels, out_size, width). */
static PyObject *run_pass(PyObject *args, int horizontal_pass)
{
    const char *name = horizontal_pass ? "horizontal_pass" : "vertical_pass";
    Py_buffer src, dst;
    int height, width, channels, first, last, out_size, ksize = -1;
    if (!PyArg_ParseTuple(args, "y*iiiiiiw*", &src, &height, &width, &channels, &first, &last, &out_size, &dst))
        return NULL;
    PyObject *result = NULL;
    int32_t *bounds = NULL, *coefs = NULL, *scratch = NULL;
    int band_limit = horizontal_pass ? height : width;
    if (channels < 1 || channels > 4 || (horizontal_pass && LANES % channels) || height < 1 || width < 1 ||
        out_size < 1 || first < 0 || last > band_limit || first > last) {
        PyErr_Format(PyExc_ValueError, "%s: sizes out of range", name);
        goto done;
    }
    Py_ssize_t src_len = (Py_ssize_t)height * width * channels;
    Py_ssize_t dst_len = horizontal_pass ? (Py_ssize_t)height * out_size * channels
                                         : (Py_ssize_t)channels * out_size * width;
    if (src.len != src_len || dst.len != dst_len) {
        PyErr_Format(PyExc_ValueError, "%s: the source holds %zd bytes for %zd expected, the output %zd for %zd",
                     name, src.len, src_len, dst.len, dst_len);
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    ksize = coefficients(horizontal_pass ? width : height, out_size, &bounds, &coefs);
    /* the horizontal pass's transposed block, or the vertical pass's accumulators for one output row */
    size_t scratch_len = horizontal_pass ? (size_t)width * LANES : (size_t)(last - first) * channels + 1;
    scratch = ksize < 0 ? NULL : malloc(sizeof(int32_t) * scratch_len);
    if (scratch && last > first) {
        if (horizontal_pass)
            horizontal(src.buf, width, channels, first, last, out_size, bounds, coefs, ksize, dst.buf, scratch);
        else
            vertical(src.buf, width, channels, first, last, out_size, bounds, coefs, ksize, dst.buf, scratch);
    }
    Py_END_ALLOW_THREADS
    if (!scratch) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    free(bounds);
    free(coefs);
    free(scratch);
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyObject *py_horizontal(PyObject *self, PyObject *args) { return run_pass(args, 1); }

static PyObject *py_vertical(PyObject *self, PyObject *args) { return run_pass(args, 0); }

static PyMethodDef methods[] = {
    {"horizontal_pass", py_horizontal, METH_VARARGS,
     "horizontal_pass(src, height, width, channels, row0, row1, out_width, dst): Pillow's horizontal BICUBIC pass "
     "over rows [row0, row1); src and dst are C-contiguous (rows, columns, channels) uint8 buffers."},
    {"vertical_pass", py_vertical, METH_VARARGS,
     "vertical_pass(src, height, width, channels, col0, col1, out_height, dst): Pillow's vertical BICUBIC pass over "
     "columns [col0, col1) of an interleaved src, written to a planar (channels, out_height, width) dst."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_exact_resize",
                                    "Pillow's BICUBIC resize of 8-bit images, the same bytes, vectorised.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__exact_resize(void) { return PyModule_Create(&module); }
