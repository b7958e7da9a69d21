/*
 * anisoctf.spectrum._kernels: the whole-image passes of the micrograph spectrum, compiled.
 *
 * power_bin2: |F|² of a half-plane FFT, in place, and its 2×2 binning, in one pass.
 * block_moments: the sums and sums of squares of the pixels of b×b blocks, from every step-th
 * row, for the outlier-tile statistics (anisoctf.spectrum.periodogram._grid_tile_features).
 *
 * The periodogram of a micrograph is scale * |F|², written over the first half of F's own memory
 * (row r of the power takes the floats [r n, (r + 1) n) of the buffer, row r of F the floats
 * [2 r n, 2 (r + 1) n): going row by row, forwards, nothing is overwritten before it is read).
 * The fit then bins that power 2×2; doing it here, while the two rows are still in the cache,
 * saves reading the power again. The numbers are those of the numpy path (same float32
 * operations in the same order); tests/test_spectrum.py pins that. Optional, like
 * anisoctf.fit._cells: without a C compiler the numpy paths are used.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* power_bin2(f, rows, n, scale, binned) -> None
 *
 * f: writable float32 buffer of rows * n complex64 values (2 * rows * n floats); on return its
 * first rows * n floats hold the power, row-major (rows, n).
 * binned: writable float32 buffer of (rows / 2) * (nb + 1) floats with nb = (n - 1) / 2, or empty
 * for no binning: the mean of each 2×2 block of the power; the last column holds the last power
 * column (the Nyquist column) binned along the rows only. rows must be even when binning.
 */
static PyObject *power_bin2(PyObject *self, PyObject *args) {
    Py_buffer fb, bb;
    Py_ssize_t rows, n;
    float scale;
    if (!PyArg_ParseTuple(args, "w*nnfw*", &fb, &rows, &n, &scale, &bb)) return NULL;
    const Py_ssize_t nb = (n - 1) / 2;
    const int do_bin = bb.len > 0;
    if (rows < 1 || n < 2 || fb.len != 2 * rows * n * (Py_ssize_t)sizeof(float) ||
        (do_bin && ((rows % 2) != 0 ||
                    bb.len != (rows / 2) * (nb + 1) * (Py_ssize_t)sizeof(float)))) {
        PyBuffer_Release(&fb);
        PyBuffer_Release(&bb);
        PyErr_SetString(PyExc_ValueError, "_kernels.power_bin2: inconsistent array sizes");
        return NULL;
    }
    float *buf = (float *)fb.buf;
    float *out2 = (float *)bb.buf;

    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows; r++) {
        const float *src = buf + 2 * r * n;
        float *dst = buf + r * n;
        for (Py_ssize_t j = 0; j < n; j++) { /* dst[j] is written after src[2j], src[2j+1] */
            const float re = src[2 * j], im = src[2 * j + 1];
            float p = re * re;
            p += im * im;
            p *= scale;
            dst[j] = p;
        }
        if (do_bin && (r & 1)) { /* rows r - 1 and r of the power are both complete */
            const float *a = buf + (r - 1) * n, *b = buf + r * n;
            float *o = out2 + (r / 2) * (nb + 1);
            for (Py_ssize_t c = 0; c < nb; c++) {
                float v = a[2 * c] + b[2 * c];
                v += a[2 * c + 1] + b[2 * c + 1];
                v *= 0.25f;
                o[c] = v;
            }
            o[nb] = (a[n - 1] + b[n - 1]) * 0.5f;
        }
    }
    Py_END_ALLOW_THREADS

    PyBuffer_Release(&fb);
    PyBuffer_Release(&bb);
    Py_RETURN_NONE;
}

/* block_moments(img, pitch, ny, nx, step, b, s1, s2) -> None
 *
 * img: float32 image, row-major, pitch pixels a row. For the blocks of b × b pixels of its
 * top-left (ny / b) × (nx / b) grid, from rows 0, step, 2 step, ... only (b a multiple of step):
 * s1 and s2 (float64, (ny / b) * (nx / b) each) receive the sum and the sum of squares of each
 * block's sampled pixels (accumulated in float64).
 */
static PyObject *block_moments(PyObject *self, PyObject *args) {
    Py_buffer ib, b1, b2;
    Py_ssize_t pitch, ny, nx, step, b;
    if (!PyArg_ParseTuple(args, "y*nnnnnw*w*", &ib, &pitch, &ny, &nx, &step, &b, &b1, &b2))
        return NULL;
    const Py_ssize_t hb = b > 0 ? ny / b : 0, wb = b > 0 ? nx / b : 0;
    if (ny < 1 || nx < 1 || step < 1 || b < 1 || b % step != 0 || hb < 1 || wb < 1 ||
        nx > pitch || ib.len < ((ny - 1) * pitch + nx) * (Py_ssize_t)sizeof(float) ||
        b1.len != hb * wb * (Py_ssize_t)sizeof(double) || b2.len != b1.len) {
        PyBuffer_Release(&ib);
        PyBuffer_Release(&b1);
        PyBuffer_Release(&b2);
        PyErr_SetString(PyExc_ValueError, "_kernels.block_moments: inconsistent array sizes");
        return NULL;
    }
    const float *img = (const float *)ib.buf;
    double *s1 = (double *)b1.buf, *s2 = (double *)b2.buf;

    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < hb * wb; i++) s1[i] = s2[i] = 0.0;
    for (Py_ssize_t r = 0; r < hb * b; r += step) {
        const float *row = img + r * pitch;
        double *o1 = s1 + (r / b) * wb, *o2 = s2 + (r / b) * wb;
        for (Py_ssize_t j = 0; j < wb; j++) {
            const float *p = row + j * b;
            double a = 0.0, q = 0.0;
            for (Py_ssize_t k = 0; k < b; k++) {
                const double v = (double)p[k];
                a += v;
                q += v * v;
            }
            o1[j] += a;
            o2[j] += q;
        }
    }
    Py_END_ALLOW_THREADS

    PyBuffer_Release(&ib);
    PyBuffer_Release(&b1);
    PyBuffer_Release(&b2);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"power_bin2", power_bin2, METH_VARARGS,
     "scale * |F|^2 in place and its 2x2 binning (see anisoctf.spectrum.periodogram)."},
    {"block_moments", block_moments, METH_VARARGS,
     "Sums and sums of squares of b x b blocks from every step-th row."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels",
    "Compiled whole-image passes of anisoctf.spectrum.periodogram.", -1, methods,
};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
