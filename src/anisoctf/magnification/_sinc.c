/*
 * anisoctf.magnification._sinc: the two one-dimensional passes of the sinc resampling, compiled.
 *
 * The sinc method of anisoctf.magnification.resample resamples an image in four passes: two
 * scales, each of which mixes whole rows with the same weights for every column (mix_rows), and
 * two shears, each of which transposes the image and shifts every new row by its own sub-pixel
 * amount (shear_transpose). numpy does the same with a sparse matrix product and with one
 * multiply and one add per tap over blocks of rows; at 512² and 1024² those calls and their
 * temporaries, not the arithmetic, set the time. Here each output value is one dot product of
 * K float32 taps, accumulated in float32 in tap order as numpy does (results agree with the
 * numpy path to float32 rounding: tests/test_resample_kernels.py). Optional: without a C
 * compiler the numpy paths are used.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* mix_rows(src, n_src, ncols, out, n_out, idx, w, taps) -> None
 *
 * out[i, c] = sum_j w[i, j] * src[idx[i, j], c] for i < n_out, c < ncols; float32 src
 * (n_src, ncols) and out (n_out, ncols) row-major; idx int32 and w float32 (n_out, taps).
 */
static PyObject *mix_rows(PyObject *self, PyObject *args) {
    Py_buffer sb, ob, ib, wb;
    Py_ssize_t n_src, ncols, n_out, taps;
    if (!PyArg_ParseTuple(args, "y*nnw*ny*y*n", &sb, &n_src, &ncols, &ob, &n_out, &ib, &wb, &taps))
        return NULL;
    int ok = taps >= 1 && sb.len == n_src * ncols * (Py_ssize_t)sizeof(float) &&
             ob.len == n_out * ncols * (Py_ssize_t)sizeof(float) &&
             ib.len == n_out * taps * (Py_ssize_t)sizeof(int32_t) &&
             wb.len == n_out * taps * (Py_ssize_t)sizeof(float);
    const int32_t *idx = (const int32_t *)ib.buf;
    for (Py_ssize_t k = 0; ok && k < n_out * taps; k++) ok = idx[k] >= 0 && idx[k] < n_src;
    if (!ok) {
        PyBuffer_Release(&sb);
        PyBuffer_Release(&ob);
        PyBuffer_Release(&ib);
        PyBuffer_Release(&wb);
        PyErr_SetString(PyExc_ValueError, "_sinc.mix_rows: inconsistent array sizes or indices");
        return NULL;
    }
    const float *src = (const float *)sb.buf, *w = (const float *)wb.buf;
    float *out = (float *)ob.buf;

    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n_out; i++) {
        float *o = out + i * ncols;
        const int32_t *ii = idx + i * taps;
        const float *wi = w + i * taps;
        if (taps == 8) { /* all taps in one pass over the row (the same sums, in tap order) */
            const float *restrict s0 = src + (Py_ssize_t)ii[0] * ncols, *restrict s1 = src + (Py_ssize_t)ii[1] * ncols;
            const float *restrict s2 = src + (Py_ssize_t)ii[2] * ncols, *restrict s3 = src + (Py_ssize_t)ii[3] * ncols;
            const float *restrict s4 = src + (Py_ssize_t)ii[4] * ncols, *restrict s5 = src + (Py_ssize_t)ii[5] * ncols;
            const float *restrict s6 = src + (Py_ssize_t)ii[6] * ncols, *restrict s7 = src + (Py_ssize_t)ii[7] * ncols;
            const float w0 = wi[0], w1 = wi[1], w2 = wi[2], w3 = wi[3];
            const float w4 = wi[4], w5 = wi[5], w6 = wi[6], w7 = wi[7];
            float *restrict oo = o;
            for (Py_ssize_t c = 0; c < ncols; c++) {
                float a = w0 * s0[c];
                a += w1 * s1[c];
                a += w2 * s2[c];
                a += w3 * s3[c];
                a += w4 * s4[c];
                a += w5 * s5[c];
                a += w6 * s6[c];
                a += w7 * s7[c];
                oo[c] = a;
            }
            continue;
        }
        const float *s0 = src + (Py_ssize_t)ii[0] * ncols;
        const float w0 = wi[0];
        for (Py_ssize_t c = 0; c < ncols; c++) o[c] = w0 * s0[c];
        for (Py_ssize_t j = 1; j < taps; j++) {
            const float *s = src + (Py_ssize_t)ii[j] * ncols;
            const float wj = wi[j];
            for (Py_ssize_t c = 0; c < ncols; c++) o[c] += wj * s[c];
        }
    }
    Py_END_ALLOW_THREADS

    PyBuffer_Release(&sb);
    PyBuffer_Release(&ob);
    PyBuffer_Release(&ib);
    PyBuffer_Release(&wb);
    Py_RETURN_NONE;
}

#define BLOCK 32 /* rows transposed at a time: 32 floats = two cache lines of each source row */

/* shear_transpose(src, n_src, rows, out, n_out, start, w, taps) -> None
 *
 * out[r, m] = sum_j w[r, j] * src[start[r] + m + j, r] for r < rows, m < n_out: row r of the
 * result is column r of src (float32, (n_src, rows) row-major) read from start[r] (int32) on.
 * out is float32 (rows, n_out), w float32 (rows, taps). Every start[r] + n_out + taps - 1 must
 * be at most n_src. Columns are transposed BLOCK at a time into a buffer that stays in cache.
 */
static PyObject *shear_transpose(PyObject *self, PyObject *args) {
    Py_buffer sb, ob, stb, wb;
    Py_ssize_t n_src, rows, n_out, taps;
    if (!PyArg_ParseTuple(args, "y*nnw*ny*y*n", &sb, &n_src, &rows, &ob, &n_out, &stb, &wb, &taps))
        return NULL;
    int ok = taps >= 1 && sb.len == n_src * rows * (Py_ssize_t)sizeof(float) &&
             ob.len == rows * n_out * (Py_ssize_t)sizeof(float) &&
             stb.len == rows * (Py_ssize_t)sizeof(int32_t) &&
             wb.len == rows * taps * (Py_ssize_t)sizeof(float);
    const int32_t *start = (const int32_t *)stb.buf;
    for (Py_ssize_t r = 0; ok && r < rows; r++)
        ok = start[r] >= 0 && start[r] + n_out + taps - 1 <= n_src;
    float *buf = ok ? (float *)PyMem_RawMalloc((size_t)BLOCK * n_src * sizeof(float)) : NULL;
    if (!ok || buf == NULL) {
        PyBuffer_Release(&sb);
        PyBuffer_Release(&ob);
        PyBuffer_Release(&stb);
        PyBuffer_Release(&wb);
        if (ok) return PyErr_NoMemory();
        PyErr_SetString(PyExc_ValueError, "_sinc.shear_transpose: inconsistent sizes or starts");
        return NULL;
    }
    const float *src = (const float *)sb.buf, *w = (const float *)wb.buf;
    float *out = (float *)ob.buf;

    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r0 = 0; r0 < rows; r0 += BLOCK) {
        const Py_ssize_t k = rows - r0 < BLOCK ? rows - r0 : BLOCK;
        /* the rows each block reads: from its smallest start to its largest end */
        Py_ssize_t lo = start[r0], hi = start[r0];
        for (Py_ssize_t b = 1; b < k; b++) {
            if (start[r0 + b] < lo) lo = start[r0 + b];
            if (start[r0 + b] > hi) hi = start[r0 + b];
        }
        hi += n_out + taps - 1;
        for (Py_ssize_t i = lo; i < hi; i++) {
            const float *s = src + i * rows + r0;
            for (Py_ssize_t b = 0; b < k; b++) buf[b * n_src + i] = s[b];
        }
        for (Py_ssize_t b = 0; b < k; b++) {
            const float *s = buf + b * n_src + start[r0 + b];
            const float *wr = w + (r0 + b) * taps;
            float *o = out + (r0 + b) * n_out;
            if (taps == 8) { /* all taps in one pass (the same sums, in tap order) */
                const float w0 = wr[0], w1 = wr[1], w2 = wr[2], w3 = wr[3];
                const float w4 = wr[4], w5 = wr[5], w6 = wr[6], w7 = wr[7];
                const float *restrict ss = s;
                float *restrict oo = o;
                for (Py_ssize_t m = 0; m < n_out; m++) {
                    float a = w0 * ss[m];
                    a += w1 * ss[m + 1];
                    a += w2 * ss[m + 2];
                    a += w3 * ss[m + 3];
                    a += w4 * ss[m + 4];
                    a += w5 * ss[m + 5];
                    a += w6 * ss[m + 6];
                    a += w7 * ss[m + 7];
                    oo[m] = a;
                }
                continue;
            }
            const float w0 = wr[0];
            for (Py_ssize_t m = 0; m < n_out; m++) o[m] = w0 * s[m];
            for (Py_ssize_t j = 1; j < taps; j++) {
                const float wj = wr[j];
                const float *sj = s + j;
                for (Py_ssize_t m = 0; m < n_out; m++) o[m] += wj * sj[m];
            }
        }
    }
    Py_END_ALLOW_THREADS

    PyMem_RawFree(buf);
    PyBuffer_Release(&sb);
    PyBuffer_Release(&ob);
    PyBuffer_Release(&stb);
    PyBuffer_Release(&wb);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"mix_rows", mix_rows, METH_VARARGS,
     "out[i] = sum_j w[i, j] src[idx[i, j]] (rows of float32 images)."},
    {"shear_transpose", shear_transpose, METH_VARARGS,
     "out[r, m] = sum_j w[r, j] src[start[r] + m + j, r] (transpose and shift each row)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_sinc",
    "Compiled passes of the sinc resampling (anisoctf.magnification.resample).", -1, methods,
};

PyMODINIT_FUNC PyInit__sinc(void) { return PyModule_Create(&module); }
