/*
 * anisoctf.fit._cells: the pixel loop of anisoctf.fit.band.compressed_zone, compiled.
 *
 * compressed_zone gathers the spectrum pixels of an annulus into cells of equal CTF phase and
 * sums, per cell, the pixel count, the power and a few products of the frequency. Its numpy
 * version makes about thirty passes over temporary arrays per pixel; this loop makes one, with
 * the same arithmetic in the same order, so both give the same cells (tests/test_spectrum.py
 * pins that). It is optional: without a C compiler the package uses the numpy version.
 *
 * Only the buffer protocol is used (no numpy headers), so building needs nothing but Python's
 * own headers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

typedef struct {
    Py_buffer b;
    int held;
} buf_t;

static void release(buf_t *bufs, int n) {
    for (int i = 0; i < n; i++) {
        if (bufs[i].held) {
            PyBuffer_Release(&bufs[i].b);
            bufs[i].held = 0;
        }
    }
}

/* accumulate(power, itemsize, ncol, seg_row, seg_start, seg_len, kx1, ky1, mag, lo2, hi2,
 *            scale, ca1, ca2, use_astig, r0, n_ang, n_cells, bin1, acc, cnt) -> number of pixels whose
 * cell fell outside [0, n_cells - 1) (always 0 unless the caller's bounds are wrong).
 *
 * power: float32 (itemsize 4) or float64 (itemsize 8), rows * ncol, in its own precision; seg_*: int64; kx1, ky1: float64; mag: 0 or 4 float64 (row-major
 * M); acc: float64 (n_sums * n_cells) with n_sums 5, or 6 with mag; cnt: float64 (n_cells).
 */
static PyObject *accumulate(PyObject *self, PyObject *args) {
    buf_t bufs[10] = {{{0}}};
    Py_ssize_t itemsize, ncol;
    double lo2, hi2, scale, ca1, ca2;
    int use_astig, bin1;
    long long r0, n_ang, n_cells;
    if (!PyArg_ParseTuple(args, "y*nny*y*y*y*y*y*dddddiLLLiw*w*", &bufs[0].b, &itemsize, &ncol,
                          &bufs[1].b,
                          &bufs[2].b, &bufs[3].b, &bufs[4].b, &bufs[5].b, &bufs[6].b, &lo2, &hi2,
                          &scale, &ca1, &ca2, &use_astig, &r0, &n_ang, &n_cells, &bin1,
                          &bufs[7].b, &bufs[8].b)) {
        return NULL;
    }
    for (int i = 0; i < 9; i++) bufs[i].held = 1;

    const float *power_f = (const float *)bufs[0].b.buf;
    const double *power_d = (const double *)bufs[0].b.buf;
    const int is_double = itemsize == 8;
    const int64_t *seg_row = (const int64_t *)bufs[1].b.buf;
    const int64_t *seg_start = (const int64_t *)bufs[2].b.buf;
    const int64_t *seg_len = (const int64_t *)bufs[3].b.buf;
    const double *kx1 = (const double *)bufs[4].b.buf;
    const double *ky1 = (const double *)bufs[5].b.buf;
    const double *mag = (const double *)bufs[6].b.buf;
    double *acc = (double *)bufs[7].b.buf;
    double *cnt = (double *)bufs[8].b.buf;

    Py_ssize_t n_power = (itemsize == 4 || itemsize == 8) ? bufs[0].b.len / itemsize : 0;
    Py_ssize_t n_seg = bufs[1].b.len / (Py_ssize_t)sizeof(int64_t);
    Py_ssize_t n_kx = bufs[4].b.len / (Py_ssize_t)sizeof(double);
    Py_ssize_t n_ky = bufs[5].b.len / (Py_ssize_t)sizeof(double);
    int has_mag = bufs[6].b.len == 4 * (Py_ssize_t)sizeof(double);
    int n_sums = has_mag ? 6 : 5;

    if (bufs[2].b.len != bufs[1].b.len || bufs[3].b.len != bufs[1].b.len ||
        (bufs[6].b.len != 0 && !has_mag) || n_cells < 1 || n_ang < 1 || ncol < 1 ||
        (itemsize != 4 && itemsize != 8) ||
        bufs[8].b.len != n_cells * (Py_ssize_t)sizeof(double) ||
        bufs[7].b.len != n_sums * n_cells * (Py_ssize_t)sizeof(double)) {
        release(bufs, 10);
        PyErr_SetString(PyExc_ValueError, "_cells.accumulate: inconsistent array sizes");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n_seg; i++) {  /* every pixel read must lie inside its array */
        int64_t r = seg_row[i], s = seg_start[i], l = seg_len[i];
        if (r < 0 || r >= n_ky || s < 0 || l < 0 || s + l > n_kx || s + l > ncol ||
            (r + 1) * (int64_t)ncol > n_power) {
            release(bufs, 10);
            PyErr_SetString(PyExc_ValueError, "_cells.accumulate: segment outside the arrays");
            return NULL;
        }
    }

    const double m00 = has_mag ? mag[0] : 1.0, m01 = has_mag ? mag[1] : 0.0;
    const double m10 = has_mag ? mag[2] : 0.0, m11 = has_mag ? mag[3] : 1.0;
    const double half = 0.5 * (double)n_ang, neg_half = -0.5 * (double)n_ang;
    const int64_t dump = n_cells - 1;
    double *a_pow = acc, *a_x2 = acc + n_cells, *a_y2 = acc + 2 * n_cells;
    double *a_xy = acc + 3 * n_cells, *a_k4 = acc + 4 * n_cells;
    double *a_rho = has_mag ? acc + 5 * n_cells : NULL;
    long long bad = 0;

    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n_seg; i++) {
        const int64_t rr = seg_row[i];
        const double ky = ky1[rr];
        const int64_t row0 = rr * (int64_t)ncol;
        const int64_t c1 = seg_start[i] + seg_len[i];
        for (int64_t cc = seg_start[i]; cc < c1; cc++) {
            const double kx = kx1[cc];
            double kxt = kx, kyt = ky;
            if (has_mag) {
                kxt = m00 * kx + m01 * ky;
                kyt = m10 * kx + m11 * ky;
            }
            const double x2 = kxt * kxt, y2 = kyt * kyt, xy = kxt * kyt;
            const double k2 = x2 + y2;
            if (k2 < lo2 || k2 > hi2) continue;
            if (bin1 && cc == 0 && ky < 0) continue; /* kx = 0: +ky and -ky are one point */
            int64_t r_idx;
            if (use_astig) {
                double u = (x2 - y2) * ca1;
                u += k2;
                u += ca2 * xy;
                u *= scale;
                r_idx = (int64_t)u;
            } else {
                r_idx = (int64_t)(k2 * scale);
            }
            r_idx -= r0;
            if (r_idx < 0) r_idx = 0;
            /* direction folded to the upper half plane, then the pseudo-angle 1 - x/(|x| + y) */
            const double ux = kyt < 0 ? -kxt : kxt;
            double den = fabs(ux) + fabs(kyt);
            if (den < 1e-300) den = 1e-300;
            double pa = ux / den;
            pa *= neg_half;
            pa += half;
            int64_t a_idx = (int64_t)pa;
            if (a_idx > n_ang - 1) a_idx = n_ang - 1;
            const int64_t cell = r_idx * n_ang + a_idx;
            if (cell < 0 || cell >= dump) {
                bad++;
                continue;
            }
            cnt[cell] += 1.0;
            a_pow[cell] += is_double ? power_d[row0 + cc] : (double)power_f[row0 + cc];
            a_x2[cell] += x2;
            a_y2[cell] += y2;
            a_xy[cell] += xy;
            a_k4[cell] += k2 * k2;
            if (a_rho) a_rho[cell] += kx * kx + ky * ky;
        }
    }
    Py_END_ALLOW_THREADS

    release(bufs, 10);
    return PyLong_FromLongLong(bad);
}

static PyMethodDef methods[] = {
    {"accumulate", accumulate, METH_VARARGS,
     "Sum the pixels of annulus segments into phase cells (see anisoctf.fit.band)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cells",
    "Compiled pixel loop of anisoctf.fit.band.compressed_zone.", -1, methods,
};

PyMODINIT_FUNC PyInit__cells(void) { return PyModule_Create(&module); }
